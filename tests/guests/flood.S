/*
 * flood: prints 'x' on COM1 forever, as fast as the exits go (no THRE wait),
 * for what ember does when nobody reads its stdout.
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    mov dx, COM1_THR
    mov al, 'x'
1:  out dx, al
    jmp 1b
