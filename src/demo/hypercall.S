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
    .include "guest.inc"            /* COM1 and exit-port constants, the macros below */
    .set HYPERCALL_PORT, 0x510
    .set HC_WHO, 1
    .set HC_COUNT, 2

    PVH_NOTE _start

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
    xor al, al
    GUEST_EXIT

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

/* putc: print AL on COM1; puts: print the NUL-terminated string at ESI. Both
 * wait for THRE before every byte (guest.inc). */
    PUTC_PUTS32

    .section .rodata
msg_ask:   .asciz "guest: OUT 1 to port 0x510 (who are you?); the VMM answers: "
msg_count: .asciz "guest: OUT 2 to port 0x510 (how many hypercalls?); the VMM answers: "
msg_bye:   .asciz "guest: done, writing 0 to the exit port\n"

    .section .bss
    .balign 16
stack:  .skip 1024
stack_top:
