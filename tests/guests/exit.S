/*
 * exit: end the VM the way the command line says.
 *   status=N   print "status N", write N to the exit device (port 0x501)
 *   reset      print "reset", pulse the reset line through the i8042 (0xfe to 0x64)
 *   wide=2     with status=N: write N as a 2-byte OUT (AX = 0x1200 | N)
 *   wide=4     with status=N: write N as a 4-byte OUT (EAX = 0xabcd1200 | N);
 *              if the VM survives the wide write, print "still running", exit 99
 * Anything else: status 0.
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    lea rdi, [key_reset]
    call after
    test rax, rax
    jnz do_reset

    xor ebx, ebx
    lea rdi, [key_status]
    call after
    test rax, rax
    jz 1f
    mov rdi, rax
    call parse_dec
    mov rbx, rax
1:  lea rdi, [msg_status]
    call puts
    mov rdi, rbx
    call putdec
    mov al, '\n'
    call putc
    lea rdi, [key_wide2]
    call after
    test rax, rax
    jnz wide2
    lea rdi, [key_wide4]
    call after
    test rax, rax
    jnz wide4
    mov eax, ebx
    jmp exit

wide2:
    mov eax, ebx
    and eax, 0xff
    or eax, 0x1200
    mov dx, EXIT_PORT
    out dx, ax
    jmp survived
wide4:
    mov eax, ebx
    and eax, 0xff
    or eax, 0xabcd1200
    mov dx, EXIT_PORT
    out dx, eax
survived:
    lea rdi, [msg_survived]
    call puts
    mov al, 99
    jmp exit

do_reset:
    lea rdi, [msg_reset]
    call puts
    mov al, I8042_CMD_RESET
    out I8042_COMMAND_PORT, al
2:  jmp 2b                      /* not reached: the VM is gone */


    .section .rodata
key_reset:  .asciz "reset"
key_status: .asciz "status="
key_wide2:  .asciz "wide=2"
key_wide4:  .asciz "wide=4"
msg_survived: .asciz "still running\n"
msg_status: .asciz "status "
msg_reset:  .asciz "reset\n"
