/*
 * ember's `echo` guest: the smallest useful guest, the VM counterpart of
 * `echo ARGS`. It prints its kernel command line and a newline on COM1, then
 * writes status 0 to the exit port. `ember bench` runs it against `echo` in
 * a container, so both runtimes do the same work: one line out, exit.
 *
 * It never leaves the 32-bit protected mode PVH starts it in (xen
 * docs/misc/pvh.pandoc: paging off, EBX -> hvm_start_info): no page tables,
 * no mode switch, nothing but port I/O. Plain integer instructions only.
 */
    .intel_syntax noprefix
    .include "guest.inc"        /* COM1 and exit-port constants, the macros below */

    PVH_NOTE _start

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    mov esi, [ebx + 24]         /* hvm_start_info.cmdline_paddr (low 32 bits) */
    test esi, esi
    jz 1f
    COM1_PUTS_FIFO esi          /* wait for an empty transmit FIFO, then fill it:
                                   up to 16 bytes per wait, until the NUL */
1:  mov dx, COM1_THR
    mov al, '\n'
    out dx, al
    xor eax, eax                /* status 0 */
    GUEST_EXIT
