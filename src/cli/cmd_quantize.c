/* rwkvpipe quantize: writes a copy of a weights file with the big nn.Linear
 * matrices (rp_tensor_quantizable) in bf16, int8 or int8row (cpu/cpu_quant.h defines
 * the rounding; docs/formats.md the layout), the LoRA factors in bf16,
 * every other tensor as it was.
 * One tensor at a time from the mmapped input; atomic output (temp name,
 * fsync, rename). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/safetensors.h"
#include "cpu/cpu_quant.h"
#include "model/model.h"

static void quantize_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe quantize IN.safetensors -o OUT.safetensors --type bf16|int8|int8row\n"
            "Writes IN with the time mix's receptance/key/value/output, the channel mix's\n"
            "key/value and the head in bf16, int8 (blocks of 32 along the input axis,\n"
            "one fp16 scale each) or int8row (one f32 scale per row), the LoRA factors\n"
            "(att.w1/w2/a1/a2/v1/v2/g1/g2) in bf16 (an int8/int8row model quantizes them\n"
            "to its own int8 format while loading);\n"
            "the other tensors are copied unchanged (docs/formats.md).\n"
            "generate, serve, eval and logits load the result (CPU backend).\n"
            "  --type T            bf16, int8 or int8row\n"
            "  -o, --output FILE   where to write (atomically: temp name, fsync, rename)\n"
            "  -q, --quiet         no progress on stderr\n"
            "  -h, --help          this text\n");
}

/* The official suffix of a file tensor name when it is a quantizable matrix
 * stored as nn.Linear ([N,K], no transpose), or (lora set) a LoRA factor
 * the format keeps in bf16 (rp_tensor_lora_lowp, any layout: its values
 * are rounded one by one), else NULL. */
static const char *matrix_suffix(const char *name, rp_naming naming, int lora) {
    const char *layer_prefix = naming == RP_NAMING_HF ? "model.layers." : "blocks.";
    size_t lp = strlen(layer_prefix);
    const char *rest = name;
    int per_layer = 0;
    if (strncmp(name, layer_prefix, lp) == 0) {
        rest = name + lp;
        while (*rest >= '0' && *rest <= '9') rest++;
        if (rest == name + lp || *rest != '.') return NULL;
        rest++;
        per_layer = 1;
    }
    if (naming == RP_NAMING_OFFICIAL)
        return (lora ? rp_tensor_lora_lowp(rest) : rp_tensor_quantizable(rest)) ? rest : NULL;
    int n;
    const rp_hf_name *rows = rp_hf_names(&n);
    for (int i = 0; i < n; i++)
        if (rows[i].per_layer == per_layer && strcmp(rows[i].hf, rest) == 0 &&
            (lora ? rp_tensor_lora_lowp(rows[i].official)
                  : rows[i].kind == RP_HF_SAME && rp_tensor_quantizable(rows[i].official)))
            return rows[i].official;
    return NULL;
}

int cmd_quantize(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {{"type", required_argument, 0, 't'},
                                             {"output", required_argument, 0, 'o'},
                                             {"quiet", no_argument, 0, 'q'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    const char *out = NULL, *type_name = NULL;
    int quiet = 0, c;
    while ((c = getopt_long(argc, argv, "ho:q", longopts, NULL)) != -1) {
        switch (c) {
        case 't': type_name = optarg; break;
        case 'o': out = optarg; break;
        case 'q': quiet = 1; break;
        case 'h': quantize_usage(stdout); return 0;
        default: quantize_usage(stderr); return 2;
        }
    }
    if (optind >= argc) cli_fatal(cli, "IN.safetensors is required (rwkvpipe quantize --help)");
    if (optind + 1 < argc) cli_fatal(cli, "unexpected argument '%s'", argv[optind + 1]);
    const char *in = argv[optind];
    if (!out) cli_fatal(cli, "-o OUT.safetensors is required");
    if (!type_name) cli_fatal(cli, "--type bf16|int8|int8row is required");
    rp_qtype qt;
    if (rp_qtype_from_name(type_name, &qt) != 0 || qt == RP_QTYPE_F32)
        cli_fatal(cli, "--type: '%s' is not bf16, int8 or int8row", type_name);

    rp_error err;
    rp_st_file f;
    rp_config cfg;
    rp_naming naming;
    if (rp_st_open(&f, in, &err) != RP_OK || rp_config_from_safetensors(&f, &cfg, &naming, &err))
        cli_fatal_error(cli, &err);
    if (rp_file_weights_type(&f) != RP_WEIGHTS_F32)
        cli_fatal(cli, "%s is already quantized (metadata quantization '%s'): quantize the f32 "
                  "or bf16 original", in, rp_st_meta(&f, "quantization") ? rp_st_meta(&f, "quantization") : "int8");

    rp_st_writer w;
    rp_st_writer_init(&w);
    void **owned = cli_calloc(cli, 2 * (size_t)f.n_tensors + 1, sizeof(void *), "buffers");
    int n_owned = 0, n_quantized = 0;
    size_t bytes_in = 0, bytes_out = 0;
    char name[300];
    for (int i = 0; i < f.n_tensors; i++) {
        const rp_st_tensor *t = &f.tensors[i];
        bytes_in += t->nbytes;
        const char *suffix = matrix_suffix(t->name, naming, 0);
        if (!suffix && matrix_suffix(t->name, naming, 1) && t->dtype != RP_DTYPE_BF16) {
            /* A LoRA factor: bf16 in both formats' files; an int8 model
             * quantizes it from these values at load (docs/perf/cpu.md). */
            float *wf = cli_calloc(cli, t->numel ? (size_t)t->numel : 1, sizeof(float), t->name);
            if (rp_st_read_f32_release(&f, t, wf, t->numel, &err) != RP_OK ||
                rp_st_writer_add(&w, t->name, RP_DTYPE_BF16, RP_DTYPE_F32, t->ndim, t->shape, wf,
                                 &err) != RP_OK)
                cli_fatal_error(cli, &err);
            owned[n_owned++] = wf;
            bytes_out += (size_t)t->numel * 2;
            if (!quiet) cli_info(cli, "%s -> bf16 (LoRA factor)", t->name);
            continue;
        }
        if (!suffix) {
            if (rp_st_writer_add(&w, t->name, t->dtype, t->dtype, t->ndim, t->shape, t->data,
                                 &err) != RP_OK)
                cli_fatal_error(cli, &err);
            bytes_out += t->nbytes;
            continue;
        }
        if (t->ndim != 2 || t->shape[0] > (1 << 30) || t->shape[1] > (1 << 30))
            cli_fatal(cli, "%s: tensor '%s' is not a [N,K] matrix", in, t->name);
        const int N = (int)t->shape[0], K = (int)t->shape[1];
        if (!rp_qtype_fits(qt, K))
            cli_fatal(cli, "%s: tensor '%s' [%d, %d]: %s needs the input axis (%d) to be a "
                      "multiple of %d; use --type bf16", in, t->name, N, K, rp_qtype_name(qt), K,
                      RP_Q8_BLOCK);
        float *wf = cli_calloc(cli, (size_t)N * K, sizeof(float), t->name);
        if (rp_st_read_f32_release(&f, t, wf, t->numel, &err) != RP_OK) cli_fatal_error(cli, &err);
        size_t db = rp_qmatrix_data_bytes(qt, N, K), sb = rp_qmatrix_scale_bytes(qt, N, K);
        void *data = cli_calloc(cli, db, 1, t->name);
        void *scales = sb ? cli_calloc(cli, sb, 1, t->name) : NULL;
        rp_quantize_matrix(qt, data, scales, wf, N, K, 0);
        free(wf);
        owned[n_owned++] = data;
        if (scales) owned[n_owned++] = scales;
        /* scales: int8's F16 [N, K/32], int8row's F32 [N, 1] */
        const int row = qt == RP_QTYPE_Q8ROW;
        const int64_t shape[2] = {N, K}, sshape[2] = {N, row ? 1 : K / RP_Q8_BLOCK};
        const rp_dtype sdt = row ? RP_DTYPE_F32 : RP_DTYPE_F16;
        rp_dtype dt = qt == RP_QTYPE_BF16 ? RP_DTYPE_BF16 : RP_DTYPE_I8;
        if (rp_st_writer_add(&w, t->name, dt, dt, 2, shape, data, &err) != RP_OK)
            cli_fatal_error(cli, &err);
        if (scales) {
            snprintf(name, sizeof name, "%s.scales", t->name);
            if (rp_st_writer_add(&w, name, sdt, sdt, 2, sshape, scales, &err) != RP_OK)
                cli_fatal_error(cli, &err);
        }
        bytes_out += db + sb;
        n_quantized++;
        if (!quiet) cli_info(cli, "%s [%d, %d] -> %s", t->name, N, K, rp_qtype_name(qt));
    }
    for (int i = 0; i < f.n_meta; i++)
        if (strcmp(f.meta_keys[i], "quantization") != 0 &&
            rp_st_writer_add_meta(&w, f.meta_keys[i], f.meta_values[i], &err) != RP_OK)
            cli_fatal_error(cli, &err);
    const char *scheme = qt == RP_QTYPE_BF16 ? "bf16.v1"
                         : qt == RP_QTYPE_Q8ROW ? RP_INT8ROW_SCHEME
                                                : RP_INT8_SCHEME;
    if (rp_st_writer_add_meta(&w, "quantization", scheme, &err) != RP_OK ||
        rp_st_writer_write(&w, out, &err) != RP_OK)
        cli_fatal_error(cli, &err);
    cli_info(cli, "wrote %s: %d matrices as %s, %.1f MiB (from %.1f MiB)", out, n_quantized,
             rp_qtype_name(qt), (double)bytes_out / (1 << 20), (double)bytes_in / (1 << 20));
    rp_st_writer_free(&w);
    for (int i = 0; i < n_owned; i++) free(owned[i]);
    free(owned);
    rp_st_close(&f);
    return 0;
}
