# ctest driver: the library must never abort, exit or print. Lists the symbols
# libpikv references from outside and fails on any that would do so.
# Inputs: LIBRARY (path to libpikv), NM.
execute_process(COMMAND ${NM} -u ${LIBRARY} RESULT_VARIABLE rc OUTPUT_VARIABLE syms ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${NM} -u ${LIBRARY} failed: ${err}")
endif()
set(forbidden abort exit _exit _Exit quick_exit __assert_fail __assert perror puts putchar
    printf fprintf vprintf vfprintf fputs fputc fwrite putc __printf_chk __fprintf_chk
    __vfprintf_chk __vprintf_chk __stack_chk_fail_local_print)
set(bad "")
foreach(s ${forbidden})
  if(syms MATCHES "(^|[ \n])U ${s}(@[^\n]*)?\n")
    list(APPEND bad ${s})
  endif()
endforeach()
if(bad)
  message(FATAL_ERROR "libpikv references ${bad}: the library must not abort, exit or print")
endif()
string(REGEX MATCHALL "U [A-Za-z_0-9]+" used "${syms}")
list(REMOVE_DUPLICATES used)
list(LENGTH used n)
message(STATUS "libpikv references ${n} outside symbols, none of them aborts, exits or prints")
