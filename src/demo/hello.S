/*
 * ember's built-in demo guest: the smallest program that walks through every
 * layer a Linux kernel crosses on its way to a prompt.
 *
 *  1. The VMM (ember, or QEMU -M microvm) loads this ELF at 1 MiB and finds the
 *     PVH note (XEN_ELFNOTE_PHYS32_ENTRY, xen docs/misc/pvh.pandoc): it starts
 *     the vCPU at `_start` in 32-bit protected mode, paging off, EBX pointing
 *     at the hvm_start_info structure.
 *  2. It points CR3 at page tables prebuilt in the image (an identity map of
 *     the first 2 MiB, one large page), enables PAE, sets EFER.LME, turns
 *     paging on and far-jumps into a 64-bit code segment: it is now in long
 *     mode (Intel SDM vol. 3, 9.8.5).
 *  3. It talks to the 16550 UART at 0x3f8 with IN/OUT: every access is a VM
 *     exit that KVM hands to the VMM, which emulates the UART.
 *  4. It prints the command line the VMM passed (start_info.cmdline_paddr) and
 *     writes status 0 to the exit port 0x501: ember exits with that status.
 *
 * Plain integer instructions only: on hosts whose KVM emulates guest kernel
 * code instruction by instruction (kvm_pvm), that is all it can run.
 */
    .intel_syntax noprefix
    .include "guest.inc"        /* COM1 and exit-port constants, the macros below */

    PVH_NOTE _start

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    mov esi, ebx                /* keep the start_info pointer */

    /* The page tables are prebuilt in .data (IDENTITY_MAP_2MIB): no loop to
     * run. PAE, CR3, EFER.LME, then paging on (SDM 9.8.5). */
    ENTER_LONG_MODE pml4
    lgdt [gdt_ptr]
    ljmp 0x08, offset long_mode

    .code64
long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    lea rsp, [stack_top]

    lea rbx, [msg_hello]
    call puts
    lea rbx, [msg_cmdline]
    call puts
    mov ebx, [rsi + 24]         /* hvm_start_info.cmdline_paddr (low 32 bits) */
    test ebx, ebx
    jz 2f
    call puts
2:  lea rbx, [msg_bye]
    call puts

    xor eax, eax                /* status 0 */
    GUEST_EXIT

/* puts: print the NUL-terminated string at RBX on COM1. Waits for "transmitter
 * holding register empty" (LSR bit 5), then writes up to 16 bytes: the depth of
 * the 16550A's transmit FIFO (datasheet, "FIFO mode"). */
puts:
    COM1_PUTS_FIFO rbx
    ret

    .section .rodata
    .balign 8
gdt:
    .quad 0                     /* null */
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff    /* 0x10: data */
gdt_ptr:
    .word gdt_ptr - gdt - 1
    .long gdt
msg_hello:
    .asciz "Hello from a guest in 64-bit long mode, via the 16550 UART at 0x3f8.\n"
msg_cmdline:
    .asciz "Kernel command line: "
msg_bye:
    .asciz "\nWriting status 0 to the exit port 0x501. Bye.\n"

    .section .data
    IDENTITY_MAP_2MIB           /* pml4 -> pdpt -> pd: 0..2 MiB, one large page */

    .section .bss
    .balign 16
stack:  .skip 1024
stack_top:
