/*
 * virtio_blk: a minimal virtio-mmio block driver (virtio 1.2, 4.2.3 and 5.2)
 * for the first device ember places at 0xd0000000. It polls the used ring
 * (no interrupt handler), and prints one line per step:
 *
 *   magic=74726976 version=2 device=2
 *   features_ok ro=<0|1>
 *   read=<status> sector0=[<sector 0 up to its first NUL>]
 *   write=<status>              (sector 1 := 512 bytes of 'G')
 *   flush=<status>
 *   getid=<status> id=[<serial>]
 *   unsupp=<status>             (request type 99)
 *   done
 *
 * then exits with status 0. Any setup failure prints `fail <what>` and exits 1.
 * With `reqs=N` on the command line it instead reads sector 0 N times, prints
 * `reqs done`, and exits 0: the benchmark's request round trip. With `hold`
 * it stops after the flush: prints `flushed, holding` and halts forever (with
 * interrupts off), for a test that kills ember there.
 *
 * Memory it uses (free RAM above this 1 MiB image, identity-mapped):
 *   0x300000 descriptor table (8 entries), 0x300100 avail ring, 0x300200 used ring
 *   0x301000 request header, 0x302000 data buffer (512 bytes), 0x303000 status byte
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .include "virtio_mmio.inc"      /* VIRTIO_MMIO_* registers, the setup steps as macros */

    .set VIRTIO_BASE, 0xd0000000
    .set VIRTIO_BLK_F_RO, 5
    .set VIRTIO_BLK_T_IN, 0
    .set VIRTIO_BLK_T_OUT, 1
    .set VIRTIO_BLK_T_FLUSH, 4
    .set VIRTIO_BLK_T_GET_ID, 8

    .set QSIZE, 8
    .set DESC, 0x300000
    .set AVAIL, 0x300100
    .set USED, 0x300200
    .set HDR, 0x301000
    .set DATA, 0x302000
    .set STATUS, 0x303000

    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    mov r14, VIRTIO_BASE
    xor r13d, r13d                      /* avail.idx we published */
    xor r12d, r12d                      /* used.idx we have seen */

    /* Identify the device (4.2.3.1.1). */
    lea rdi, [msg_magic]
    call puts
    mov edi, [r14 + VIRTIO_MMIO_MAGIC_VALUE]
    mov ebx, edi
    call puthex8
    lea rdi, [msg_version]
    call puts
    mov edi, [r14 + VIRTIO_MMIO_VERSION]
    call putdec
    lea rdi, [msg_device]
    call puts
    mov edi, [r14 + VIRTIO_MMIO_DEVICE_ID]
    call putdec
    call newline
    lea rdi, [fail_ident]
    cmp ebx, 0x74726976
    jne fail
    cmp dword ptr [r14 + VIRTIO_MMIO_VERSION], 2
    jne fail
    cmp dword ptr [r14 + VIRTIO_MMIO_DEVICE_ID], 2
    jne fail

    /* Reset, ACKNOWLEDGE, DRIVER, features (3.1.1): require VERSION_1, read
     * the low half of the device's features (for VIRTIO_BLK_F_RO) and accept
     * none of it, then VERSION_1 and FEATURES_OK. */
    VIRTIO_MMIO_RESET_ACK_DRIVER r14
    VIRTIO_MMIO_CHECK_VERSION_1 r14, edi
    mov dword ptr [r14 + VIRTIO_MMIO_DEVICE_FEATURES_SEL], 0
    mov ebx, [r14 + VIRTIO_MMIO_DEVICE_FEATURES]
    mov dword ptr [r14 + VIRTIO_MMIO_DRIVER_FEATURES_SEL], 0
    mov dword ptr [r14 + VIRTIO_MMIO_DRIVER_FEATURES], 0
    VIRTIO_MMIO_FEATURES_OK r14, edi
    lea rdi, [msg_features]
    call puts
    mov edi, ebx
    shr edi, VIRTIO_BLK_F_RO
    and edi, 1
    call putdec
    call newline

    /* Queue 0: size 8, rings in low RAM (4.2.3.2); then DRIVER_OK. */
    VIRTIO_MMIO_SETUP_QUEUE r14, edi, 0, QSIZE, DESC, AVAIL, USED
    VIRTIO_MMIO_DRIVER_OK r14

    /* Benchmark mode? */
    lea rdi, [key_reqs]
    call after
    test rax, rax
    jnz bench

    /* Read sector 0. */
    mov byte ptr [DATA + 512], 0        /* a NUL after the buffer for puts */
    mov edi, VIRTIO_BLK_T_IN
    xor esi, esi
    mov edx, 512
    mov ecx, VRING_DESC_F_WRITE
    call request
    mov ebx, eax
    lea rdi, [msg_read]
    call puts
    mov edi, ebx
    call putdec
    lea rdi, [msg_sector0]
    call puts
    mov rdi, DATA
    call puts
    lea rdi, [msg_close]
    call puts

    /* Write sector 1: 512 bytes of 'G'. */
    mov rdi, DATA
    mov ecx, 512
1:  mov byte ptr [rdi], 'G'
    inc rdi
    dec ecx
    jnz 1b
    mov edi, VIRTIO_BLK_T_OUT
    mov esi, 1
    mov edx, 512
    xor ecx, ecx
    call request
    lea rdi, [msg_write]
    call report

    /* Flush: header and status only. */
    mov edi, VIRTIO_BLK_T_FLUSH
    xor esi, esi
    xor edx, edx
    xor ecx, ecx
    call request
    lea rdi, [msg_flush]
    call report

    /* Durability test mode: the write is flushed; stop here, alive, until
     * the host kills ember. */
    lea rdi, [key_hold]
    call after
    test rax, rax
    jz 7f
    lea rdi, [msg_holding]
    call puts
8:  cli
    hlt
    jmp 8b
7:
    /* GET_ID into a zeroed buffer. */
    mov rdi, DATA
    mov ecx, 32
2:  mov byte ptr [rdi], 0
    inc rdi
    dec ecx
    jnz 2b
    mov edi, VIRTIO_BLK_T_GET_ID
    xor esi, esi
    mov edx, 20
    mov ecx, VRING_DESC_F_WRITE
    call request
    mov ebx, eax
    lea rdi, [msg_getid]
    call puts
    mov edi, ebx
    call putdec
    lea rdi, [msg_id]
    call puts
    mov rdi, DATA
    call puts
    lea rdi, [msg_close]
    call puts

    /* An unsupported request type. */
    mov edi, 99
    xor esi, esi
    mov edx, 512
    mov ecx, VRING_DESC_F_WRITE
    call request
    lea rdi, [msg_unsupp]
    call report

    lea rdi, [msg_done]
    call puts
    xor eax, eax
    jmp exit

bench:
    mov rdi, rax
    call parse_dec
    mov rbx, rax
3:  test rbx, rbx
    jz 4f
    mov edi, VIRTIO_BLK_T_IN
    xor esi, esi
    mov edx, 512
    mov ecx, VRING_DESC_F_WRITE
    call request
    dec rbx
    jmp 3b
4:  lea rdi, [msg_reqs]
    call puts
    xor eax, eax
    jmp exit

/* request: one request of type EDI at sector ESI with a data buffer of EDX
 * bytes at DATA (none if EDX = 0) whose descriptor flags are ECX; waits for
 * the device to use it and returns the status byte in EAX. */
request:
    mov dword ptr [HDR], edi
    mov dword ptr [HDR + 4], 0
    mov dword ptr [HDR + 8], esi
    mov dword ptr [HDR + 12], 0
    mov byte ptr [STATUS], 0xff
    /* desc 0: header -> 1 (or -> 2 without data) */
    mov qword ptr [DESC], HDR
    mov dword ptr [DESC + 8], 16
    mov word ptr [DESC + 12], VRING_DESC_F_NEXT
    mov word ptr [DESC + 14], 1
    test edx, edx
    jnz 5f
    mov word ptr [DESC + 14], 2
5:  /* desc 1: data -> 2 */
    mov qword ptr [DESC + 16], DATA
    mov dword ptr [DESC + 24], edx
    or ecx, VRING_DESC_F_NEXT
    mov word ptr [DESC + 28], cx
    mov word ptr [DESC + 30], 2
    /* desc 2: status, device-writable */
    mov qword ptr [DESC + 32], STATUS
    mov dword ptr [DESC + 40], 1
    mov word ptr [DESC + 44], VRING_DESC_F_WRITE
    mov word ptr [DESC + 46], 0
    /* avail.ring[idx % QSIZE] = 0; avail.idx = idx + 1 */
    mov eax, r13d
    and eax, QSIZE - 1
    mov word ptr [AVAIL + 4 + rax * 2], 0
    inc r13d
    mov word ptr [AVAIL + 2], r13w
    mov dword ptr [r14 + VIRTIO_MMIO_QUEUE_NOTIFY], 0
6:  movzx eax, word ptr [USED + 2]      /* poll used.idx */
    cmp ax, r12w
    je 6b
    inc r12d
    movzx eax, byte ptr [STATUS]
    ret

/* report: print the string at RDI, then EAX in decimal, then a newline. */
report:
    push rax
    call puts
    pop rdi
    call putdec
    jmp newline

/* puthex8: print EDI as 8 hex digits. */
puthex8:
    push rcx
    push rdi
    shl rdi, 32
    mov ecx, 8
1:  rol rdi, 4
    mov eax, edi
    and eax, 0xf
    cmp eax, 10
    jb 2f
    add eax, 'a' - '0' - 10
2:  add eax, '0'
    call putc
    dec ecx
    jnz 1b
    pop rdi
    pop rcx
    ret

    .section .rodata
key_reqs:      .asciz "reqs="
key_hold:      .asciz "hold"
msg_holding:   .asciz "flushed, holding\n"
msg_magic:     .asciz "magic="
msg_version:   .asciz " version="
msg_device:    .asciz " device="
msg_features:  .asciz "features_ok ro="
msg_read:      .asciz "read="
msg_sector0:   .asciz " sector0=["
msg_close:     .asciz "]\n"
msg_write:     .asciz "write="
msg_flush:     .asciz "flush="
msg_getid:     .asciz "getid="
msg_id:        .asciz " id=["
msg_unsupp:    .asciz "unsupp="
msg_done:      .asciz "done\n"
msg_reqs:      .asciz "reqs done\n"
fail_ident:    .asciz "identify"
fail_version1: .asciz "VERSION_1 not offered"
fail_features: .asciz "FEATURES_OK refused"
fail_queue:    .asciz "queue setup"
