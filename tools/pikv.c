/* The `pikv` command-line program: subcommand dispatch, --help and --version. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static void main_usage(FILE *f)
{
    fputs("usage: pikv <command> [options]\n"
          "\n"
          "PiKV: a KV-cache runtime for Mixture-of-Experts LLM inference.\n"
          "\n"
          "commands:\n"
          "  devices     list the devices PiKV finds (name, backend, memory, capabilities)\n"
          "  run         run a synthetic MoE decode workload through the cache and check it\n"
          "              against a dense double-precision reference\n"
          "  generate    generate text with a real model (GGUF) whose KV cache is a PiKV cache\n"
          "  demo        the README's main command: 'generate' with the cached MoE model and\n"
          "              PiKV's expert-sharded reads ('run' when no model is installed)\n"
          "  eval        accuracy against KV memory on the real model: perplexity, top-1\n"
          "              agreement and passkey retrieval per cache configuration\n"
          "  bench       benchmarks: every device against its measured read roofline,\n"
          "              sparse and quantized reads against dense, PiKV against baselines\n"
          "  help [CMD]  show this help, or a command's help\n"
          "\n"
          "options:\n"
          "  --version   print the version of the program and of the linked library\n"
          "  -h, --help  show this help\n"
          "\n"
          "'pikv <command> --help' describes a command's options.\n",
          f);
}

static int print_version(void)
{
    printf("pikv %s (library %s)\n", PIKV_VERSION_STRING, pikv_version_string());
    if (pikv_version_number() != PIKV_VERSION_NUMBER)
        fprintf(stderr, "pikv: warning: built against PiKV %s but linked with %s\n",
                PIKV_VERSION_STRING, pikv_version_string());
    return CLI_EXIT_OK;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        main_usage(stderr);
        return CLI_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "-V") == 0 ||
        strcmp(cmd, "version") == 0)
        return print_version();
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        main_usage(stdout);
        return CLI_EXIT_OK;
    }
    if (strcmp(cmd, "help") == 0) {
        if (argc < 3) {
            main_usage(stdout);
            return CLI_EXIT_OK;
        }
        char help[] = "--help";
        char *sub_argv[3] = {argv[0], argv[2], help};
        if (strcmp(argv[2], "devices") == 0) return cli_cmd_devices(3, sub_argv);
        if (strcmp(argv[2], "run") == 0) return cli_cmd_run(3, sub_argv);
        if (strcmp(argv[2], "generate") == 0) return cli_cmd_generate(3, sub_argv);
        if (strcmp(argv[2], "demo") == 0) return cli_cmd_demo(3, sub_argv);
        if (strcmp(argv[2], "eval") == 0) return cli_cmd_eval(3, sub_argv);
        if (strcmp(argv[2], "bench") == 0) return cli_cmd_bench(3, sub_argv);
        fprintf(stderr, "pikv: unknown command '%s' (see 'pikv --help')\n", argv[2]);
        return CLI_EXIT_USAGE;
    }
    if (strcmp(cmd, "devices") == 0) return cli_cmd_devices(argc, argv);
    if (strcmp(cmd, "run") == 0) return cli_cmd_run(argc, argv);
    if (strcmp(cmd, "generate") == 0) return cli_cmd_generate(argc, argv);
    if (strcmp(cmd, "demo") == 0) return cli_cmd_demo(argc, argv);
    if (strcmp(cmd, "eval") == 0) return cli_cmd_eval(argc, argv);
    if (strcmp(cmd, "bench") == 0) return cli_cmd_bench(argc, argv);
    if (cmd[0] == '-')
        fprintf(stderr, "pikv: unknown option '%s' (see 'pikv --help')\n", cmd);
    else
        fprintf(stderr, "pikv: unknown command '%s' (see 'pikv --help')\n", cmd);
    return CLI_EXIT_USAGE;
}
