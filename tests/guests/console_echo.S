/*
 * console_echo: print a prompt, then echo every byte received on COM1 (polling
 * LSR.DR, reading RBR) until a `q`; then spin a while (so a test can close
 * ember's stdin meanwhile), print "bye" and exit with status 0.
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    lea rdi, [msg_prompt]
    call puts
1:  call getc
    call putc
    cmp al, 'q'
    jne 1b

    /* A delay loop (~0.2 s under kvm_pvm's emulator, ~1 ms on hardware). */
    mov ecx, 100000
2:  dec ecx
    jnz 2b

    lea rdi, [msg_bye]
    call puts
    xor eax, eax
    jmp exit


    .section .rodata
msg_prompt: .asciz "echo> "
msg_bye:    .asciz "\nbye\n"
