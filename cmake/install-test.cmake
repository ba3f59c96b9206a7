# ctest driver: install this build into a scratch prefix, then build and run an
# outside consumer twice: with find_package(pikv) and with pkg-config.
# Inputs: BUILD_DIR, SOURCE_DIR, WORK_DIR, C_COMPILER, C_FLAGS (the build's own,
# so a sanitizer build links its consumer with the same runtime).
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

# find_package(pikv)
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/install-consumer -B ${WORK_DIR}/cmake-build
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_C_COMPILER=${C_COMPILER} "-DCMAKE_C_FLAGS=${C_FLAGS}")
run(${CMAKE_COMMAND} --build ${WORK_DIR}/cmake-build)
run(${WORK_DIR}/cmake-build/consumer)

# pkg-config
find_program(PKG_CONFIG pkg-config REQUIRED)
file(GLOB pcdir LIST_DIRECTORIES true ${prefix}/lib*/pkgconfig)
set(ENV{PKG_CONFIG_PATH} "${pcdir}")
execute_process(COMMAND ${PKG_CONFIG} --cflags --libs --static pikv
                RESULT_VARIABLE rc OUTPUT_VARIABLE flags OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pkg-config does not find pikv in ${pcdir}")
endif()
separate_arguments(flags UNIX_COMMAND "${flags}")
separate_arguments(build_flags UNIX_COMMAND "${C_FLAGS}")
run(${C_COMPILER} -std=c11 ${build_flags} ${SOURCE_DIR}/tests/install-consumer/main.c ${flags}
    -o ${WORK_DIR}/consumer-pc)
run(${WORK_DIR}/consumer-pc)
