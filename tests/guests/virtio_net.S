/*
 * virtio_net: a minimal virtio-mmio network driver (virtio 1.2, 4.2.3 and
 * 5.1) for the first device ember places at 0xd0000000. It negotiates
 * VERSION_1 and MAC only (so every buffer starts with the 12-byte
 * virtio_net_hdr_v1 and a frame never spans buffers), polls the used rings
 * (no interrupt handler) and prints:
 *
 *   device=1
 *   mac=<12 hex digits, from the configuration space>
 *   status=<config status, 1 = link up>
 *   probe done                    (with `probe` on the command line: exit 0 here)
 *   arp-request sent
 *   arp-reply ip=0a000001 mac=<12 hex digits>   (the host's answer for 10.0.0.1)
 *   rx <hex of the whole frame, vnet header excluded>   (any other frame)
 *   done                          (after a frame of EtherType 0x88b6: exit 0)
 *
 * The guest is 10.0.0.2; it sends one ARP request "who has 10.0.0.1".
 * Any setup failure prints `fail <what>` and exits 1.
 *
 * Memory (free RAM above this 1 MiB image, identity-mapped):
 *   0x300000 RX descriptors (8), 0x300100 RX avail, 0x300200 RX used
 *   0x301000 TX descriptors (8), 0x301100 TX avail, 0x301200 TX used
 *   0x310000 four RX buffers of 2 KiB, 0x320000 the TX buffer, 0x330000 the MAC
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .include "virtio_mmio.inc"      /* VIRTIO_MMIO_* registers, the setup steps as macros */

    .set VIRTIO_BASE, 0xd0000000
    .set VIRTIO_NET_F_MAC, 5
    .set HDR_LEN, 12

    .set QSIZE, 8
    .set RX_DESC, 0x300000
    .set RX_AVAIL, 0x300100
    .set RX_USED, 0x300200
    .set TX_DESC, 0x301000
    .set TX_AVAIL, 0x301100
    .set TX_USED, 0x301200
    .set RX_BUF, 0x310000
    .set RX_BUF_SIZE, 0x800
    .set RX_COUNT, 4
    .set TX_BUF, 0x320000
    .set MAC, 0x330000

    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    mov r14, VIRTIO_BASE
    xor r13d, r13d                      /* RX avail.idx published */
    xor r12d, r12d                      /* RX used.idx seen */
    xor r11d, r11d                      /* TX avail.idx published */

    lea rdi, [msg_device]
    call puts
    mov edi, [r14 + VIRTIO_MMIO_DEVICE_ID]
    call putdec
    call newline
    lea rdi, [fail_ident]
    cmp dword ptr [r14 + VIRTIO_MMIO_DEVICE_ID], 1
    jne fail

    /* Reset, ACKNOWLEDGE, DRIVER; accept VERSION_1 and MAC (3.1.1). */
    VIRTIO_MMIO_RESET_ACK_DRIVER r14
    mov dword ptr [r14 + VIRTIO_MMIO_DEVICE_FEATURES_SEL], 0
    mov eax, [r14 + VIRTIO_MMIO_DEVICE_FEATURES]
    lea rdi, [fail_mac]
    test eax, 1 << VIRTIO_NET_F_MAC
    jz fail
    mov dword ptr [r14 + VIRTIO_MMIO_DRIVER_FEATURES_SEL], 0
    mov dword ptr [r14 + VIRTIO_MMIO_DRIVER_FEATURES], 1 << VIRTIO_NET_F_MAC
    VIRTIO_MMIO_FEATURES_OK r14, edi

    /* The MAC, byte by byte from the configuration space (5.1.4). */
    xor ecx, ecx
1:  mov al, [r14 + VIRTIO_MMIO_CONFIG + rcx]
    mov [MAC + rcx], al
    inc ecx
    cmp ecx, 6
    jne 1b
    lea rdi, [msg_mac]
    call puts
    mov rdi, MAC
    mov ecx, 6
    call puthexbytes
    call newline
    lea rdi, [msg_status]
    call puts
    movzx edi, word ptr [r14 + VIRTIO_MMIO_CONFIG + 6]
    call putdec
    call newline

    /* Queue 0 (receiveq1) and queue 1 (transmitq1), size 8. */
    VIRTIO_MMIO_SETUP_QUEUE r14, edi, 0, QSIZE, RX_DESC, RX_AVAIL, RX_USED
    VIRTIO_MMIO_SETUP_QUEUE r14, edi, 1, QSIZE, TX_DESC, TX_AVAIL, TX_USED
    VIRTIO_MMIO_DRIVER_OK r14

    lea rdi, [key_probe]
    call after
    test rax, rax
    jz 2f
    lea rdi, [msg_probe]
    call puts
    xor eax, eax
    jmp exit

    /* RX_COUNT device-writable buffers, descriptor i -> RX_BUF + i * 2 KiB. */
2:  xor ecx, ecx
3:  mov rax, rcx
    shl rax, 11
    add rax, RX_BUF
    mov rdx, rcx
    shl rdx, 4
    mov [RX_DESC + rdx], rax
    mov dword ptr [RX_DESC + rdx + 8], RX_BUF_SIZE
    mov word ptr [RX_DESC + rdx + 12], VRING_DESC_F_WRITE
    mov word ptr [RX_DESC + rdx + 14], 0
    mov edi, ecx
    call rx_post
    inc ecx
    cmp ecx, RX_COUNT
    jne 3b
    mov dword ptr [r14 + VIRTIO_MMIO_QUEUE_NOTIFY], 0

    /* The ARP request (RFC 826): who has 10.0.0.1? tell 10.0.0.2. */
    mov rdi, TX_BUF
    mov ecx, HDR_LEN
4:  mov byte ptr [rdi], 0
    inc rdi
    dec ecx
    jnz 4b
    mov rdi, TX_BUF + HDR_LEN
    mov dword ptr [rdi], 0xffffffff     /* destination: broadcast */
    mov word ptr [rdi + 4], 0xffff
    mov eax, [MAC]                      /* source: our MAC */
    mov [rdi + 6], eax
    mov ax, [MAC + 4]
    mov [rdi + 10], ax
    mov word ptr [rdi + 12], 0x0608     /* EtherType 0x0806, big endian */
    mov dword ptr [rdi + 14], 0x00080100 /* htype 1, ptype 0x0800 */
    mov dword ptr [rdi + 18], 0x01000406 /* hlen 6, plen 4, oper 1 */
    mov eax, [MAC]                      /* sender hardware address */
    mov [rdi + 22], eax
    mov ax, [MAC + 4]
    mov [rdi + 26], ax
    mov dword ptr [rdi + 28], 0x0200000a /* sender IP 10.0.0.2 */
    mov dword ptr [rdi + 32], 0         /* target hardware address: unknown */
    mov word ptr [rdi + 36], 0
    mov dword ptr [rdi + 38], 0x0100000a /* target IP 10.0.0.1 */
    mov edi, HDR_LEN + 42
    call transmit
    lea rdi, [msg_arp_sent]
    call puts

    /* Receive until the end marker. */
rx_loop:
    movzx eax, word ptr [RX_USED + 2]
    cmp ax, r12w
    je rx_loop
    mov eax, r12d
    and eax, QSIZE - 1
    mov ebx, [RX_USED + 4 + rax * 8]    /* id: the descriptor (= buffer) index */
    mov r10d, [RX_USED + 8 + rax * 8]   /* len, vnet header included */
    inc r12d
    mov rsi, rbx
    shl rsi, 11
    add rsi, RX_BUF + HDR_LEN           /* the Ethernet frame */
    sub r10d, HDR_LEN
    cmp word ptr [rsi + 12], 0x0608     /* ARP */
    jne 5f
    cmp word ptr [rsi + 20], 0x0200     /* reply */
    jne 5f
    lea rdi, [msg_arp_reply]
    call puts
    lea rdi, [rsi + 28]                 /* sender IP */
    mov ecx, 4
    call puthexbytes
    lea rdi, [msg_arp_mac]
    call puts
    lea rdi, [rsi + 22]                 /* sender MAC */
    mov ecx, 6
    call puthexbytes
    call newline
    jmp 6f
5:  lea rdi, [msg_rx]
    call puts
    mov rdi, rsi
    mov ecx, r10d
    call puthexbytes
    call newline
    cmp word ptr [rsi + 12], 0xb688     /* EtherType 0x88b6: the end */
    je rx_done
6:  mov edi, ebx                        /* give the buffer back */
    call rx_post
    mov dword ptr [r14 + VIRTIO_MMIO_QUEUE_NOTIFY], 0
    jmp rx_loop

rx_done:
    lea rdi, [msg_done]
    call puts
    xor eax, eax
    jmp exit

/* rx_post: put RX descriptor EDI in the RX avail ring (no notify). */
rx_post:
    mov eax, r13d
    and eax, QSIZE - 1
    mov [RX_AVAIL + 4 + rax * 2], di
    inc r13d
    mov [RX_AVAIL + 2], r13w
    ret

/* transmit: send the EDI bytes at TX_BUF (vnet header included) as one
 * descriptor and wait until the device used it. */
transmit:
    mov qword ptr [TX_DESC], TX_BUF
    mov [TX_DESC + 8], edi
    mov dword ptr [TX_DESC + 12], 0     /* flags 0, next 0 */
    mov eax, r11d
    and eax, QSIZE - 1
    mov word ptr [TX_AVAIL + 4 + rax * 2], 0
    inc r11d
    mov [TX_AVAIL + 2], r11w
    mov dword ptr [r14 + VIRTIO_MMIO_QUEUE_NOTIFY], 1
1:  movzx eax, word ptr [TX_USED + 2]
    cmp ax, r11w
    jne 1b
    ret

/* puthexbytes: print the ECX bytes at RDI as hex, two digits each. */
puthexbytes:
    push rcx
    push rdi
    push rbx
1:  test ecx, ecx
    jz 3f
    movzx ebx, byte ptr [rdi]
    mov eax, ebx
    shr eax, 4
    call hexdigit
    mov eax, ebx
    and eax, 0xf
    call hexdigit
    inc rdi
    dec ecx
    jmp 1b
3:  pop rbx
    pop rdi
    pop rcx
    ret

/* hexdigit: print the low nibble in EAX. */
hexdigit:
    cmp eax, 10
    jb 1f
    add eax, 'a' - '0' - 10
1:  add eax, '0'
    jmp putc

    .section .rodata
key_probe:     .asciz "probe"
msg_device:    .asciz "device="
msg_mac:       .asciz "mac="
msg_status:    .asciz "status="
msg_probe:     .asciz "probe done\n"
msg_arp_sent:  .asciz "arp-request sent\n"
msg_arp_reply: .asciz "arp-reply ip="
msg_arp_mac:   .asciz " mac="
msg_rx:        .asciz "rx "
msg_done:      .asciz "done\n"
fail_ident:    .asciz "not a network device"
fail_mac:      .asciz "VIRTIO_NET_F_MAC not offered"
fail_features: .asciz "FEATURES_OK refused"
fail_queue:    .asciz "queue setup"
