/*
 * big: a 3 MiB image (code at 1 MiB, then 3 MiB of data), for the message
 * ember gives when a kernel does not fit in --memory. Spins if it ever runs.
 */
    .intel_syntax noprefix
    .section .text.entry, "ax"
    .globl _start
_start:
    jmp _start
    .section .data
    .fill 3 << 20, 1, 0
