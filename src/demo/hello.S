/*
 * ember's built-in demo guest: the smallest program that walks through every
 * layer a Linux kernel crosses on its way to a prompt.
 *
 *  1. The VMM (ember, or QEMU -M microvm) loads this ELF at 1 MiB and finds the
 *     PVH note (XEN_ELFNOTE_PHYS32_ENTRY, xen docs/misc/pvh.pandoc): it starts
 *     the vCPU at `_start` in 32-bit protected mode, paging off, EBX pointing
 *     at the hvm_start_info structure.
 *  2. The guest builds page tables (1 GiB identity map, 2 MiB pages), enables
 *     PAE, sets EFER.LME, turns paging on and far-jumps into a 64-bit code
 *     segment: it is now in long mode (Intel SDM vol. 3, 9.8.5).
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

    /* PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> i * 2 MiB (present, RW, PS). */
    lea eax, [pdpt + 3]
    mov [pml4], eax
    lea eax, [pd + 3]
    mov [pdpt], eax
    xor ecx, ecx
1:  mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov [pd + ecx * 8], eax
    inc ecx
    cmp ecx, 512
    jne 1b

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

/* puts: print the NUL-terminated string at RBX on COM1. */
puts:
    mov al, [rbx]
    test al, al
    jz 5f
    mov ah, al
    mov dx, COM1_LSR
4:  in al, dx                   /* wait for "transmitter holding register empty" */
    test al, UART_LSR_THRE
    jz 4b
    mov al, ah
    mov dx, COM1_THR
    out dx, al
    inc rbx
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

    .section .bss
    .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
stack:  .skip 4096
stack_top:
