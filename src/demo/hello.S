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

    .set COM1_THR, 0x3f8
    .set COM1_LSR, 0x3fd
    .set UART_LSR_THRE, 0x20
    .set EXIT_PORT, 0x501
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 0x100
    .set CR0_PG, 0x80000000
    .set CR4_PAE, 0x20

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
    mov esi, ebx                /* keep the start_info pointer */

    /* The page tables are prebuilt in .data (PVH loads the image at its link
     * address, so their absolute pointers are right): no loop to run. */
    mov eax, cr4
    or eax, CR4_PAE
    mov cr4, eax
    lea eax, [pml4]
    mov cr3, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME
    wrmsr
    mov eax, cr0
    or eax, CR0_PG
    mov cr0, eax
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

    mov dx, EXIT_PORT
    xor eax, eax                /* status 0 */
    out dx, al
3:  hlt                         /* not reached under ember */
    jmp 3b

/* puts: print the NUL-terminated string at RBX on COM1. Waits for "transmitter
 * holding register empty" (LSR bit 5), then writes up to 16 bytes: the depth of
 * the 16550A's transmit FIFO (datasheet, "FIFO mode"). */
puts:
    mov dx, COM1_LSR
4:  in al, dx
    test al, UART_LSR_THRE
    jz 4b
    mov ecx, 16
    mov dx, COM1_THR
6:  mov al, [rbx]
    test al, al
    jz 5f
    out dx, al
    inc rbx
    dec ecx
    jnz 6b
    jmp puts
5:  ret

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
    .balign 4096
pml4:   .quad pdpt + 3                  /* present, writable */
        .fill 511, 8, 0
pdpt:   .quad pd + 3
        .fill 511, 8, 0
pd:     .quad 0x83                      /* 0..2 MiB: present, writable, 2 MiB page */
        .fill 511, 8, 0

    .section .bss
    .balign 16
stack:  .skip 1024
stack_top:
