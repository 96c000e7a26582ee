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

    .set COM1_THR, 0x3f8
    .set COM1_LSR, 0x3fd
    .set UART_LSR_THRE, 0x20
    .set UART_FIFO_DEPTH, 16
    .set EXIT_PORT, 0x501

    .section .note.Xen, "a"
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 4                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    mov esi, [ebx + 24]         /* hvm_start_info.cmdline_paddr (low 32 bits) */
    test esi, esi
    jz 3f
1:  mov dx, COM1_LSR            /* wait for an empty transmit FIFO ... */
2:  in al, dx
    test al, UART_LSR_THRE
    jz 2b
    mov ecx, UART_FIFO_DEPTH    /* ... then fill it: up to 16 bytes per wait */
    mov dx, COM1_THR
4:  mov al, [esi]
    test al, al
    jz 3f
    out dx, al
    inc esi
    dec ecx
    jnz 4b
    jmp 1b
3:  mov dx, COM1_THR
    mov al, '\n'
    out dx, al
    mov dx, EXIT_PORT
    xor eax, eax                /* status 0 */
    out dx, al
5:  hlt                         /* not reached under ember */
    jmp 5b
