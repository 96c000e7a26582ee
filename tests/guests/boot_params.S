/*
 * boot_params: print what ember put in the zero page (Linux boot.rst):
 *
 *   cmdline_size=<hex>
 *   cmdline=[<the command line>]
 *   e820_entries=<hex>
 *   e820 <addr hex> <size hex> <type hex>      (one line per entry)
 *
 * then exit with status 0.
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi                /* boot_params */

    lea rdi, [msg_size]
    call puts
    mov edi, [r15 + BP_CMDLINE_SIZE]
    call puthex
    lea rdi, [msg_cmdline]
    call puts
    call cmdline
    mov rdi, rax
    call puts
    lea rdi, [msg_close]
    call puts

    lea rdi, [msg_entries]
    call puts
    movzx edi, byte ptr [r15 + BP_E820_ENTRIES]
    call puthex
    mov al, '\n'
    call putc

    movzx ecx, byte ptr [r15 + BP_E820_ENTRIES]
    lea rbx, [r15 + BP_E820_TABLE]
1:  test ecx, ecx
    jz 2f
    lea rdi, [msg_e820]
    call puts
    mov rdi, [rbx]              /* addr */
    call puthex
    mov al, ' '
    call putc
    mov rdi, [rbx + 8]          /* size */
    call puthex
    mov al, ' '
    call putc
    mov edi, [rbx + 16]         /* type */
    call puthex
    mov al, '\n'
    call putc
    add rbx, 20
    dec ecx
    jmp 1b

2:  xor eax, eax
    jmp exit


    .section .rodata
msg_size:    .asciz "cmdline_size="
msg_cmdline: .asciz "\ncmdline=["
msg_close:   .asciz "]\n"
msg_entries: .asciz "e820_entries="
msg_e820:    .asciz "e820 "
