/* `pikv devices`: the devices a context finds. */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

enum { OPT_HELP = 1, OPT_BACKEND, OPT_DEVICES, OPT_THREADS, OPT_MEMORY, OPT_JSON, OPT_VERBOSE };

static const cli_opt devices_opts[] = {
    {"--help", "-h", 0, OPT_HELP},
    {"--backend", NULL, 1, OPT_BACKEND},
    {"--devices", NULL, 1, OPT_DEVICES},
    {"--threads", NULL, 1, OPT_THREADS},
    {"--device-memory", NULL, 1, OPT_MEMORY},
    {"--json", NULL, 0, OPT_JSON},
    {"--verbose", "-v", 0, OPT_VERBOSE},
    {NULL, NULL, 0, 0},
};

static void devices_usage(FILE *f)
{
    fputs("usage: pikv devices [options]\n"
          "\n"
          "Lists the devices of a PiKV context: name, backend, description, memory and\n"
          "capabilities.\n"
          "\n"
          "options:\n"
          "  --backend LIST      backends to load: comma-separated names (cpu, opencl,\n"
          "                      vulkan, cuda) or 'all' (default: all)\n"
          "  --devices N         devices the CPU backend exposes, 1..64 (default: 1)\n"
          "  --threads N         CPU backend worker threads, 0 = online cores (default: 0)\n"
          "  --device-memory N   bytes each CPU device may hold, 0 = unlimited (default: 0)\n"
          "  --json              print one JSON object instead of the table\n"
          "  -v, --verbose       print the library's informational log messages\n"
          "  -h, --help          show this help\n",
          f);
}

static void caps_string(const pikv_device_caps *c, char *buf, size_t size)
{
    buf[0] = '\0';
    size_t n = 0;
    const char *flags[4];
    int count = 0;
    if (c->async_copies) flags[count++] = "async";
    if (c->host_visible) flags[count++] = "host-visible";
    if (c->f16_storage) flags[count++] = "f16";
    if (c->int8_dot) flags[count++] = "int8-dot";
    for (int i = 0; i < count && n < size; i++) {
        int w = snprintf(buf + n, size - n, "%s%s", i ? "," : "", flags[i]);
        if (w < 0) break;
        n += (size_t)w;
    }
    if (count == 0) snprintf(buf, size, "-");
}

int cli_cmd_devices(int argc, char **argv)
{
    cli_parser p;
    cli_parser_init(&p, "pikv devices", argc, argv, 2);
    const char *backend = "all";
    int32_t cpu_devices = 1, threads = 0;
    uint64_t device_memory = 0;
    int json = 0, verbose = 0;
    const char *val;
    int id;
    while ((id = cli_next_opt(&p, devices_opts, &val)) != CLI_OPT_END) {
        switch (id) {
        case CLI_OPT_ERROR: return CLI_EXIT_USAGE;
        case OPT_HELP: devices_usage(stdout); return CLI_EXIT_OK;
        case OPT_BACKEND:
            if (!*val) {
                cli_usage_error(p.cmd, "invalid value '' for --backend: expected a backend name");
                return CLI_EXIT_USAGE;
            }
            backend = val;
            break;
        case OPT_DEVICES:
            if (cli_parse_i32(&p, val, 1, 64, &cpu_devices)) return CLI_EXIT_USAGE;
            break;
        case OPT_THREADS:
            if (cli_parse_i32(&p, val, 0, 4096, &threads)) return CLI_EXIT_USAGE;
            break;
        case OPT_MEMORY:
            if (cli_parse_u64(&p, val, &device_memory)) return CLI_EXIT_USAGE;
            break;
        case OPT_JSON: json = 1; break;
        case OPT_VERBOSE: verbose = 1; break;
        default: return CLI_EXIT_USAGE;
        }
    }

    pikv_context_params cp = pikv_context_default_params();
    cp.backends = backend;
    cp.cpu_devices = cpu_devices;
    cp.cpu_threads = threads;
    cp.cpu_device_memory = device_memory;
    cli_log_filter log_filter;
    cp.log_level = cli_log_filter_init(&log_filter, verbose, 0);
    cp.log_fn = cli_log;
    cp.log_user = &log_filter;
    pikv_context *ctx = NULL;
    pikv_status st = pikv_context_create(&cp, &ctx);
    if (st != PIKV_OK) return cli_lib_error(ctx, "pikv_context_create", st);

    int32_t n = pikv_device_count(ctx);
    if (n < 0) n = 0;
    pikv_device_info *infos = calloc((size_t)(n > 0 ? n : 1), sizeof *infos);
    if (!infos) {
        fprintf(stderr, "pikv: out of memory\n");
        pikv_context_free(ctx);
        return CLI_EXIT_FAIL;
    }
    for (int32_t i = 0; i < n; i++) {
        st = pikv_device_get_info(ctx, i, &infos[i]);
        if (st != PIKV_OK) {
            int rc = cli_lib_error(ctx, "pikv_device_get_info", st);
            free(infos);
            pikv_context_free(ctx);
            return rc;
        }
        infos[i].name[sizeof infos[i].name - 1] = '\0';
        infos[i].description[sizeof infos[i].description - 1] = '\0';
    }

    if (json) {
        printf("{\n  \"pikv_version\": ");
        cli_json_string(stdout, pikv_version_string());
        printf(",\n  \"backends\": ");
        cli_json_string(stdout, backend);
        printf(",\n  \"devices\": [");
        for (int32_t i = 0; i < n; i++) {
            const pikv_device_info *d = &infos[i];
            printf("%s\n    {\"index\": %" PRId32 ", \"name\": ", i ? "," : "", i);
            cli_json_string(stdout, d->name);
            printf(", \"backend\": ");
            cli_json_string(stdout, pikv_backend_name(d->backend));
            printf(", \"backend_index\": %" PRId32 ", \"description\": ", d->backend_index);
            cli_json_string(stdout, d->description);
            printf(", \"memory_total\": %" PRIu64 ", \"memory_limit\": %" PRIu64
                   ", \"memory_used\": %" PRIu64 ", \"compute_units\": %" PRId32
                   ", \"subgroup_size\": %" PRId32
                   ", \"async_copies\": %s, \"host_visible\": %s, \"f16_storage\": %s"
                   ", \"int8_dot\": %s}",
                   d->caps.memory_total, d->caps.memory_limit, d->memory_used,
                   d->caps.compute_units, d->caps.subgroup_size,
                   d->caps.async_copies ? "true" : "false",
                   d->caps.host_visible ? "true" : "false",
                   d->caps.f16_storage ? "true" : "false", d->caps.int8_dot ? "true" : "false");
        }
        printf("%s]\n}\n", n ? "\n  " : "");
    } else {
        printf("%" PRId32 " device%s (backends: %s; PiKV %s)\n", n, n == 1 ? "" : "s", backend,
               pikv_version_string());
        if (n > 0) {
            printf("%3s  %-10s %-8s %11s %11s %11s %5s %4s  %-28s %s\n", "#", "name", "backend",
                   "memory", "limit", "used", "units", "sg", "caps", "description");
        }
        for (int32_t i = 0; i < n; i++) {
            const pikv_device_info *d = &infos[i];
            char total[32], limit[32], used[32], caps[64];
            if (d->caps.memory_total)
                cli_format_bytes(d->caps.memory_total, total, sizeof total);
            else
                snprintf(total, sizeof total, "unknown");
            if (d->caps.memory_limit)
                cli_format_bytes(d->caps.memory_limit, limit, sizeof limit);
            else
                snprintf(limit, sizeof limit, "none");
            cli_format_bytes(d->memory_used, used, sizeof used);
            caps_string(&d->caps, caps, sizeof caps);
            printf("%3" PRId32 "  %-10s %-8s %11s %11s %11s %5" PRId32 " %4" PRId32
                   "  %-28s %s\n",
                   i, d->name, pikv_backend_name(d->backend), total, limit, used,
                   d->caps.compute_units, d->caps.subgroup_size, caps, d->description);
        }
    }
    free(infos);
    pikv_context_free(ctx);
    return CLI_EXIT_OK;
}
