/*
 * hypercall: ember demo chapter 4, a port-I/O "hypercall" to the VMM.
 *
 * A paravirtual guest asks its hypervisor things no real hardware would
 * answer. Here the channel is a demo-only device on ember's port-I/O bus
 * (src/demo/hypercall.rs, registered for this chapter only): the guest writes
 * a request number to port 0x510 (an OUT: a VM exit that KVM hands to ember),
 * then reads the answer back one byte per IN until a NUL, printing it. Request
 * 1: "who are you?"; request 2: "how many hypercalls so far?".
 *
 * Entered by PVH in 32-bit protected mode; it stays there (no paging needed).
 */
    .intel_syntax noprefix
    .set COM1_THR, 0x3f8
    .set COM1_LSR, 0x3fd
    .set UART_LSR_THRE, 0x20
    .set EXIT_PORT, 0x501
    .set HYPERCALL_PORT, 0x510
    .set HC_WHO, 1
    .set HC_COUNT, 2

    .section .note.Xen, "a"
    .balign 4
    .long 4, 4, 18                  /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    mov esp, offset stack_top
    mov esi, offset msg_ask
    call puts
    mov al, HC_WHO
    call hypercall
    mov esi, offset msg_count
    call puts
    mov al, HC_COUNT
    call hypercall
    mov esi, offset msg_bye
    call puts
    mov dx, EXIT_PORT
    xor al, al
    out dx, al
1:  jmp 1b

/* hypercall: send request AL, print the answer (bytes read until NUL), newline. */
hypercall:
    mov dx, HYPERCALL_PORT
    out dx, al
1:  mov dx, HYPERCALL_PORT
    in al, dx
    test al, al
    jz 2f
    call putc
    jmp 1b
2:  mov al, '\n'
    jmp putc

/* putc: print AL on COM1. */
putc:
    mov cl, al
    mov dx, COM1_LSR
1:  in al, dx
    test al, UART_LSR_THRE
    jz 1b
    mov al, cl
    mov dx, COM1_THR
    out dx, al
    ret

/* puts: print the NUL-terminated string at ESI. */
puts:
    mov al, [esi]
    test al, al
    jz 1f
    call putc
    inc esi
    jmp puts
1:  ret

    .section .rodata
msg_ask:   .asciz "guest: OUT 1 to port 0x510 (who are you?); the VMM answers: "
msg_count: .asciz "guest: OUT 2 to port 0x510 (how many hypercalls?); the VMM answers: "
msg_bye:   .asciz "guest: done, writing 0 to the exit port\n"

    .section .bss
    .balign 16
stack:  .skip 1024
stack_top:
