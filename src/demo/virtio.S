/*
 * virtio: ember demo chapter 6, one virtio request, driven by hand.
 *
 * The smallest virtio driver there is: it finds ember's virtio-rng device
 * (the entropy device, virtio 1.2 section 5.4) on the virtio-mmio transport
 * at 0xd0000000 (section 4.2.2, register layout version 2), brings it up the
 * way Linux's drivers/virtio/virtio_mmio.c does (section 3.1.1), and asks for
 * 16 random bytes:
 *
 *  1. identify: MagicValue "virt", Version 2, DeviceID 4;
 *  2. Status = 0 (reset), ACKNOWLEDGE, DRIVER;
 *  3. features: accept VIRTIO_F_VERSION_1 (bit 32: the high half, selected
 *     with DriverFeaturesSel = 1), set FEATURES_OK and check it stuck;
 *  4. queue 0: QueueNumMax, QueueNum = 4, the three ring addresses (rings in
 *     this image's .bss), QueueReady = 1; then DRIVER_OK;
 *  5. descriptor 0 = a 16-byte device-writable buffer, avail.ring[0] = 0,
 *     avail.idx = 1, QueueNotify = 0;
 *  6. poll used.idx until the device has used the buffer (interrupts stay
 *     off: EFLAGS.IF is 0 from the PVH entry on, so no handler is needed).
 *
 * Every register access above is an MMIO access to a page no RAM backs: a VM
 * exit that KVM hands to ember (devices/virtio/mmio.rs) -- except the
 * QueueNotify write, which KVM matches against an ioeventfd and turns into an
 * eventfd signal for ember's event loop without returning from KVM_RUN.
 *
 * Entered by PVH in 32-bit protected mode with paging off; it stays there
 * (physical addresses all the way, 0xd0000000 included).
 */
    .intel_syntax noprefix
    .include "guest.inc"            /* COM1 and exit-port constants, the macros below */
    .include "virtio_mmio.inc"      /* tests/guests/: VIRTIO_MMIO_* registers, the setup steps as macros */

    .set VIRTIO_BASE, 0xd0000000
    .set VIRTIO_ID_RNG, 4
    .set EFLAGS_IF, 0x200

    .set QSIZE, 4
    .set NBYTES, 16

    PVH_NOTE _start

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    mov esp, offset stack_top
    mov ebx, VIRTIO_BASE

    /* 1. Identify the device (4.2.3.1.1). */
    mov esi, offset fail_ident
    cmp dword ptr [ebx + VIRTIO_MMIO_MAGIC_VALUE], 0x74726976     /* "virt" */
    jne fail
    cmp dword ptr [ebx + VIRTIO_MMIO_VERSION], 2
    jne fail
    cmp dword ptr [ebx + VIRTIO_MMIO_DEVICE_ID], VIRTIO_ID_RNG
    jne fail
    mov esi, offset msg_ident
    call puts

    /* 2. Reset, then "I see you" and "I can drive you" (3.1.1): Status = 0,
     * ACKNOWLEDGE, DRIVER. */
    VIRTIO_MMIO_RESET_ACK_DRIVER ebx

    /* 3. Features: the device must offer VERSION_1 (bit 32, high half); we
     * accept exactly that (DriverFeaturesSel = 1, DriverFeatures = 1). The
     * low half stays 0 since the reset. Then FEATURES_OK, and check it stuck. */
    VIRTIO_MMIO_CHECK_VERSION_1 ebx, esi
    VIRTIO_MMIO_FEATURES_OK ebx, esi
    mov esi, offset msg_features
    call puts

    /* 4. Queue 0: QueueSel = 0, QueueNumMax >= 4, QueueNum = 4, the three
     * ring addresses (rings in our .bss), QueueReady = 1 (4.2.3.2); then
     * DRIVER_OK. */
    VIRTIO_MMIO_SETUP_QUEUE ebx, esi, 0, QSIZE, desc, avail, used, max=edi  /* EDI: printed below */
    VIRTIO_MMIO_DRIVER_OK ebx
    mov esi, offset msg_queue
    call puts
    mov eax, edi
    call putdec
    mov esi, offset msg_queue_end
    call puts

    /* 5. One request: descriptor 0 (addr u64, len u32, flags u16, next u16)
     * is our buffer, device-writable; publish it in the avail ring (flags
     * u16, idx u16, ring[] u16), then ring the doorbell. */
    mov dword ptr [desc], offset buffer
    mov dword ptr [desc + 4], 0
    mov dword ptr [desc + 8], NBYTES
    mov word ptr [desc + 12], VRING_DESC_F_WRITE
    mov word ptr [desc + 14], 0
    mov word ptr [avail + 4], 0                 /* ring[0] = descriptor 0 */
    mov word ptr [avail + 2], 1                 /* idx = 1: the device may look now */
    mov dword ptr [ebx + VIRTIO_MMIO_QUEUE_NOTIFY], 0
    mov esi, offset msg_sent
    call puts

    /* 6. Poll used.idx (used: flags u16, idx u16, ring[] of {id u32, len u32}).
     * No interrupt handler: IF must still be 0. */
    pushfd
    pop eax
    mov esi, offset fail_if
    test eax, EFLAGS_IF
    jnz fail
1:  cmp word ptr [used + 2], 1
    jne 1b
    mov esi, offset fail_used
    cmp dword ptr [used + 4], 0                 /* ring[0].id: our descriptor */
    jne fail
    mov esi, offset msg_used
    call puts
    mov eax, [used + 8]                         /* ring[0].len: bytes written */
    call putdec
    mov esi, offset msg_bytes
    call puts

    mov esi, offset msg_random
    call puts
    mov edi, offset buffer
    mov ecx, NBYTES
2:  mov al, [edi]
    call puthex2
    inc edi
    dec ecx
    jnz 2b
    mov al, '\n'
    call putc
    mov esi, offset msg_bye
    call puts
    xor al, al
    jmp exit

/* fail: print "virtio: fail " and the string at ESI, exit 1. */
fail:
    push esi
    mov esi, offset msg_fail
    call puts
    pop esi
    call puts
    mov al, '\n'
    call putc
    mov al, 1
exit:
    GUEST_EXIT

/* putc: print AL on COM1 (clobbers EDX); puts: print the NUL-terminated string
 * at ESI (clobbers EAX, EDX, ESI). Both wait for THRE before every byte
 * (guest.inc). */
    PUTC_PUTS32

/* puthex2: print AL as two hex digits (clobbers EAX, EDX). */
puthex2:
    push eax
    shr al, 4
    call hexdigit
    pop eax
    and al, 0xf
hexdigit:
    cmp al, 10
    jb 1f
    add al, 'a' - '0' - 10
1:  add al, '0'
    jmp putc

/* putdec: print EAX (below 100000) in decimal (clobbers EAX, EDX, ECX, ESI). */
putdec:
    mov esi, offset decbuf_end
    mov byte ptr [esi], 0
    mov ecx, 10
1:  xor edx, edx
    div ecx
    add dl, '0'
    dec esi
    mov [esi], dl
    test eax, eax
    jnz 1b
    jmp puts

    .section .rodata
msg_ident:     .asciz "virtio: device 4 (entropy) at 0xd0000000, version 2\n"
msg_features:  .asciz "virtio: features negotiated (VERSION_1; FEATURES_OK stuck)\n"
msg_queue:     .asciz "virtio: queue 0 ready, size 4 (device max "
msg_queue_end: .asciz ")\n"
msg_sent:      .asciz "virtio: request sent (QUEUE_NOTIFY), polling the used ring with interrupts off (IF=0)\n"
msg_used:      .asciz "virtio: used ring: "
msg_bytes:     .asciz " bytes\n"
msg_random:    .asciz "random: "
msg_bye:       .asciz "guest: done, writing 0 to the exit port\n"
msg_fail:      .asciz "virtio: fail "
fail_ident:    .asciz "not a virtio-mmio version 2 entropy device"
fail_version1: .asciz "VERSION_1 not offered"
fail_features: .asciz "FEATURES_OK refused"
fail_queue:    .asciz "queue 0 setup"
fail_if:       .asciz "interrupts are on (IF=1)"
fail_used:     .asciz "used ring holds another descriptor"

    .section .bss
    .balign 4096
desc:   .skip 16 * QSIZE            /* descriptor table: 16-byte aligned */
    .balign 4
avail:  .skip 6 + 2 * QSIZE         /* driver area: 2-byte aligned */
    .balign 4
used:   .skip 6 + 8 * QSIZE         /* device area: 4-byte aligned */
    .balign 16
buffer: .skip NBYTES
decbuf: .skip 11
decbuf_end: .skip 1
    .balign 16
stack:  .skip 1024
stack_top:
