/*
 * crash: die the way the command line says.
 *   triple   load an IDT with limit 0, then `ud2`: #UD cannot be delivered
 *            (#GP), nor can the #GP (#DF), nor the #DF: a triple fault,
 *            KVM_EXIT_SHUTDOWN (Intel SDM vol. 3, 6.15 "Interrupt 8").
 *   mmio     read 4 bytes at 0xd0000000: in the 32-bit MMIO gap, where no
 *            device is mapped (yet).
 *   hlt      `hlt` with interrupts off and no irqchip: nothing can wake it.
 * Each prints "crashing: <how>" first.
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .set UNMAPPED_MMIO, 0xd0000000

    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    lea rdi, [msg_crashing]
    call puts
    call cmdline
    mov rdi, rax
    call puts
    mov al, '\n'
    call putc

    lea rdi, [key_triple]
    call after
    test rax, rax
    jnz triple
    lea rdi, [key_mmio]
    call after
    test rax, rax
    jnz mmio
    lea rdi, [key_hlt]
    call after
    test rax, rax
    jnz halt
    mov al, 1                   /* unknown request */
    jmp exit

triple:
    lidt [null_idt]
    ud2
mmio:
    mov eax, UNMAPPED_MMIO
    mov eax, [rax]
    mov al, 2                   /* not reached: the read ends the VM */
    jmp exit
halt:
    cli
    hlt
    mov al, 3                   /* not reached */
    jmp exit


    .section .rodata
    .balign 8
null_idt:
    .word 0                     /* limit 0: no vector is deliverable */
    .quad 0
key_triple:   .asciz "triple"
key_mmio:     .asciz "mmio"
key_hlt:      .asciz "hlt"
msg_crashing: .asciz "crashing: "
