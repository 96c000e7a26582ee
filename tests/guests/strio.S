/*
 * strio: string port I/O, which KVM hands to the VMM as one exit with a
 * count (KVM api.rst, KVM_EXIT_IO: size, count, data_offset).
 *   `rep insb` of 4 bytes from COM1's LSR (0x3fd): each is one 1-byte read,
 *   printed as "lsr xx xx xx xx" (an idle 16550A reads 0x60: THRE | TEMT);
 *   `rep outsb` of "outsb ok\n" to COM1's THR (0x3f8): one byte per access.
 * Then status 0.
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    cld
    lea rdi, [buf]
    mov dx, COM1_LSR
    mov ecx, 4
    rep insb

    lea rdi, [msg_lsr]
    call puts
    xor ebx, ebx
1:  mov al, ' '
    call putc
    movzx eax, byte ptr [buf + rbx]
    call puthex8
    inc ebx
    cmp ebx, 4
    jb 1b
    call newline

    lea rsi, [msg_outsb]
    mov dx, COM1_THR
    mov ecx, OFFSET msg_outsb_len
    rep outsb

    xor eax, eax
    jmp exit

/* puthex8: print AL as two lower-case hex digits. */
puthex8:
    push rcx
    mov cl, al
    shr al, 4
    call hexdigit
    mov al, cl
    and al, 0xf
    call hexdigit
    pop rcx
    ret
hexdigit:
    add al, '0'
    cmp al, '9'
    jbe 2f
    add al, 'a' - '0' - 10
2:  jmp putc

    .section .rodata
msg_lsr:    .asciz "lsr"
msg_outsb:  .ascii "outsb ok\n"
    .set msg_outsb_len, . - msg_outsb

    .section .data
buf:        .byte 0, 0, 0, 0
