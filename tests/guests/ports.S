/*
 * ports: a known number of port writes, for `--stats` and `--trace-exits`.
 *   count=K    (default 10) K one-byte OUTs to port 0x80 (unclaimed: ember
 *              ignores them), the i-th writing the byte i & 0xff
 * then one 2-byte OUT of 0xbeef and one 4-byte OUT of 0xdeadbeef to port
 * 0x84 (unclaimed too), prints "wrote K" on COM1 and exits with status 0.
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .set PORT_BYTES, 0x80
    .set PORT_WIDE, 0x84
    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    mov ebx, 10
    lea rdi, [key_count]
    call after
    test rax, rax
    jz 1f
    mov rdi, rax
    call parse_dec
    mov rbx, rax
1:  xor ecx, ecx
    test rbx, rbx
    jz 3f
2:  mov eax, ecx
    out PORT_BYTES, al
    inc rcx
    cmp rcx, rbx
    jb 2b
3:  mov ax, 0xbeef
    out PORT_WIDE, ax
    mov eax, 0xdeadbeef
    out PORT_WIDE, eax
    lea rdi, [msg_wrote]
    call puts
    mov rdi, rbx
    call putdec
    mov al, '\n'
    call putc
    xor eax, eax
    jmp exit

    .section .rodata
key_count: .asciz "count="
msg_wrote: .asciz "wrote "
