/* rwkvpipe logits: exact logits [T, V] and the final recurrent state for a
 * token sequence, written as safetensors under the golden-file names
 * (tokens, logits, state.att_x_prev [L,C], state.ffn_x_prev [L,C],
 * state.wkv [L,H,N,N]) so any reference can be compared with it. Under
 * mpirun with --pp P the layers are split over P stages; each stage computes
 * its layers' state (and gradients) and rank 0 writes the same file as one
 * process would. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "pipe/grid.h"
#include "pipe/pipe_train.h"
#include "pipe/transport.h"

/* Where this rank sits; one process is stage 0 of 1 with no transport. */
typedef struct {
    int stage, n_stages;
    rp_transport *tp;
    const rp_grid *grid;
} stage_ctx;

/* Rank 0 collects what the other stages computed (host memory), through the
 * transport's slice gather: a stage that stops answering ends the job after
 * --comm-timeout with a message naming the stage and what was awaited. */
static void gather_floats(const rp_cli *cli, const stage_ctx *sc, int from_stage, float *dst,
                          const float *src, size_t n, const char *what) {
    if (sc->n_stages == 1) {
        if (dst && src && dst != src) memcpy(dst, src, n * sizeof(float));
        return;
    }
    rp_error err;
    if (rp_transport_gather_slice(sc->tp, from_stage, dst, src, n * sizeof(float), what, &err) !=
        RP_OK)
        cli_fatal_error(cli, &err);
}

/* Fault injection for tests/test_pipeline_faults.sh: RWKVPIPE_TEST_STOP=
 * logits-grads:STAGE stops that stage (SIGSTOP) before its gradients, as a
 * hung rank would, so the others must give up after --comm-timeout. */
static void stop_point_for_tests(int stage) {
    const char *spec = getenv("RWKVPIPE_TEST_STOP");
    int want = -1;
    if (spec && sscanf(spec, "logits-grads:%d", &want) == 1 && want == stage) raise(SIGSTOP);
}

/* --grads: one step of the pipeline executor (pipe_train.c) with one
 * micro-batch of one sequence and no optimizer, the same code that trains:
 * inputs tokens[0:n], targets tokens[1:n+1], loss scale 1/n, no L2Wrap.
 * Returns the summed loss (every stage gets it). */
static double executor_grads(const rp_cli *cli, const stage_ctx *sc, rp_model *m,
                             rp_model *grads, const int32_t *tokens, int n, int time_chunks,
                             int tbptt) {
    rp_pipe_trainer pt;
    rp_pipe_step_result res;
    rp_error err;
    stop_point_for_tests(sc->stage);
    /* --time-chunks K: the same sequence as K chunks of n/K tokens, which
     * are consecutive in the inputs, as the micro-batches are. */
    if (rp_pipe_trainer_init_time_chunks(&pt, m, grads, NULL, NULL, sc->grid, sc->tp,
                                         RP_SCHEDULE_1F1B, time_chunks, 1, n / time_chunks,
                                         time_chunks, tbptt, &err) != RP_OK ||
        rp_pipe_trainer_step(&pt, tokens, tokens + 1, 1.0f / n, 0.0f, NULL, 0, &res, &err) !=
            RP_OK)
        cli_fatal_error(cli, &err);
    rp_pipe_trainer_free(&pt);
    return res.loss_sum;
}

static void logits_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe logits --model M.safetensors (--tokens 1,2,3 | --tokens-file F)\n"
            "                       -o OUT.safetensors [options]\n"
            "Runs the tokens from a zero state and writes `tokens` (I32 [T]), `logits`\n"
            "(F32 [T,V]: row t predicts token t+1) and the final state per layer:\n"
            "`state.att_x_prev`, `state.ffn_x_prev` [L,C] and `state.wkv` [L,H,N,N]\n"
            "(N = 64, the head size; row = value channel, column = key channel, as the\n"
            "official reference).\n"
            "  --model FILE        safetensors weights (official or HF/fla names)\n"
            "  --tokens LIST       comma- or space-separated token ids\n"
            "  --tokens-file FILE  the same, read from a file ('-' = stdin)\n"
            "  -o, --output FILE   where to write (atomically)\n"
            "  --mode MODE         sequence (default: T tokens per call, in chunks) or\n"
            "                      step (one token per call); both give the same numbers\n"
            "  --chunk N           tokens per sequence-mode call (default 512)\n"
            "  --grads             also write `loss` and the gradient of every parameter\n"
            "                      (official names) of the mean next-token cross-entropy:\n"
            "                      inputs tokens[0:T-1], targets tokens[1:T], zero state,\n"
            "                      no L2Wrap (the definition of the golden gradient files)\n"
            "  --time-chunks K     --grads over K time chunks of T/K tokens carrying the\n"
            "                      state, full BPTT (the same gradients; docs/training.md)\n"
            "  --tbptt             with --time-chunks: no state gradient between chunks\n"
            "  --pp P              split the layers over P pipeline stages (run under\n"
            "                      mpirun -np P); rank 0 writes the same file as one process\n"
            "  --stage-layers LIST layers per stage, e.g. 2,1,1 (default: balanced by cost)\n"
            "  --comm-timeout S    fail when a stage waits S seconds on a peer (default 300;\n"
            "                      0: wait forever)\n"
            "  --threads N         CPU threads (default: all cores / ranks on the node)\n"
            CLI_DEVICE_HELP
            CLI_WEIGHTS_HELP
            "  -h, --help          this text\n");
}

int cmd_logits(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {{"model", required_argument, 0, 'm'},
                                             {"tokens", required_argument, 0, 't'},
                                             {"tokens-file", required_argument, 0, 'f'},
                                             {"output", required_argument, 0, 'o'},
                                             {"mode", required_argument, 0, 'M'},
                                             {"chunk", required_argument, 0, 'k'},
                                             {"threads", required_argument, 0, 'j'},
                                             {"grads", no_argument, 0, 'g'},
                                             {"time-chunks", required_argument, 0, 1003},
                                             {"tbptt", no_argument, 0, 1004},
                                             {"pp", required_argument, 0, 'P'},
                                             {"stage-layers", required_argument, 0, 'A'},
                                             {"comm-timeout", required_argument, 0, 'O'},
                                             {"device", required_argument, 0, 1001},
        {"weights-dtype", required_argument, 0, 1009},
                                             {"gpu-math", required_argument, 0, 1002},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    cli_model_options mo = {0};
    const char *tokens_text = NULL, *tokens_file = NULL, *out = NULL;
    int step_mode = 0, chunk = 512, want_grads = 0, pp = 1, time_chunks = 1, tbptt = 0;
    const char *stage_layers = NULL;
    double comm_timeout = 300;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "ho:", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': mo.model_path = optarg; break;
        case 't': tokens_text = optarg; break;
        case 'f': tokens_file = optarg; break;
        case 'o': out = optarg; break;
        case 'M':
            if (strcmp(optarg, "sequence") == 0) step_mode = 0;
            else if (strcmp(optarg, "step") == 0) step_mode = 1;
            else cli_fatal(cli, "--mode: '%s' is not 'sequence' or 'step'", optarg);
            break;
        case 'k': chunk = (int)cli_parse_int(cli, "--chunk", optarg, 1, 1 << 20); break;
        case 'j': mo.threads = (int)cli_parse_int(cli, "--threads", optarg, 1, 4096); break;
        case 'g': want_grads = 1; break;
        case 'P': pp = (int)cli_parse_int(cli, "--pp", optarg, 1, RP_GRID_MAX_STAGES); break;
        case 'A': stage_layers = optarg; break;
        case 'O': comm_timeout = cli_parse_double(cli, "--comm-timeout", optarg, 0, 1e9); break;
        case 1001: cli_parse_device(cli, &mo, optarg); break;
        case 1009: cli_parse_weights_dtype(cli, &mo, optarg); break;
        case 1002: cli_parse_gpu_math(cli, &mo, optarg); break;
        case 1003:
            time_chunks = (int)cli_parse_int(cli, "--time-chunks", optarg, 1, 1 << 20);
            break;
        case 1004: tbptt = 1; break;
        case 'h': logits_usage(stdout); return 0;
        default: logits_usage(stderr); return 2;
        }
    }
    if (optind < argc) cli_fatal(cli, "unexpected argument '%s'", argv[optind]);
    if (!mo.model_path) cli_fatal(cli, "--model is required");
    if (!out) cli_fatal(cli, "-o OUT.safetensors is required");
    if (!tokens_text == !tokens_file) cli_fatal(cli, "give exactly one of --tokens and --tokens-file");
    if (cli->mpi_size != pp)
        cli_fatal(cli, "--pp %d needs exactly %d ranks (mpirun -np %d), got %d", pp, pp, pp,
                  cli->mpi_size);

    char *file_text = tokens_file ? cli_read_file(cli, tokens_file, NULL) : NULL;
    size_t T;
    int32_t *tokens = cli_parse_ids(cli, tokens_file ? tokens_file : "--tokens",
                                    tokens_file ? file_text : tokens_text, &T);
    free(file_text);
    if (T == 0) cli_fatal(cli, "no tokens given");
    if (want_grads && T < 2) cli_fatal(cli, "--grads needs at least 2 tokens (inputs and targets)");
    if (time_chunks > 1 && (!want_grads || (T - 1) % (size_t)time_chunks != 0))
        cli_fatal(cli, "--time-chunks %d needs --grads and T-1 = %zu inputs that are a multiple "
                  "of it", time_chunks, T - 1);

    rp_backend *be;
    rp_model model;
    rp_error err;
    rp_grid grid;
    rp_transport transport;
    stage_ctx sc = {.stage = 0, .n_stages = 1};
    if (pp > 1) {
        cli_load_stage_model(cli, &mo, pp, stage_layers, &grid, &be, &model);
        if (rp_transport_init(&transport, grid.pipe_comm, comm_timeout, &err) != RP_OK)
            cli_fatal_error(cli, &err);
        rp_transport_use_backend(&transport, be);  /* device buffers go through host memory */
        sc = (stage_ctx){.stage = grid.stage, .n_stages = pp, .tp = &transport, .grid = &grid};
    } else {
        cli_load_model(cli, &mo, &be, &model);
    }
    const rp_config *cfg = &model.cfg;
    const int V = cfg->vocab_size, L = cfg->n_layer;
    const int last_stage = sc.n_stages - 1;
    for (size_t i = 0; i < T; i++)
        if (tokens[i] >= V)
            cli_fatal(cli, "token %d at position %zu is outside the model's vocabulary [0, %d)",
                      tokens[i], i, V);

    int rows = step_mode ? 1 : (int)(T < (size_t)chunk ? T : (size_t)chunk);
    rp_workspace ws;
    rp_state state;
    if (rp_workspace_alloc(&ws, cfg, rows, be, &err) != RP_OK) cli_fatal_error(cli, &err);
    rp_state_geometry(&state, cfg, model.layer_begin, model.layer_end, 1);
    state.data = be->alloc(be, state.floats_per_slot * sizeof(float));
    float *logits_dev = be->alloc(be, (size_t)rows * V * sizeof(float));
    float *logits = malloc(T * (size_t)V * sizeof(float));
    if (!state.data || !logits_dev || !logits)
        cli_fatal(cli, "cannot allocate logits for %zu tokens x %d vocabulary", T, V);

    int slot = 0, row_begin = 0;
    for (size_t pos = 0; pos < T; pos += rows) {
        int len = (int)(T - pos < (size_t)rows ? T - pos : (size_t)rows);
        rp_batch batch;
        rp_batch_init(&batch, 1, &len, &slot, &row_begin);
        if (rp_pipe_forward(&model, sc.tp, sc.stage, sc.n_stages, &ws, tokens + pos, &batch,
                            &state, RP_LOGITS_ALL, logits_dev, &err) != RP_OK)
            cli_fatal_error(cli, &err);
        if (model.has_head)
            be->copy_to_host(be, logits + pos * V, logits_dev, (size_t)len * V * sizeof(float));
    }
    gather_floats(cli, &sc, last_stage, logits, logits, T * (size_t)V, "logits");

    /* Golden layout: [L, ...] per state tensor; rank 0 holds every layer's
     * state (its own, then each stage's in turn). */
    rp_state host_view;
    rp_state_geometry(&host_view, cfg, 0, L, 1);
    float *host_state =
        cli_calloc(cli, host_view.floats_per_slot, sizeof(float), "the host state copy");
    host_view.data = host_state;
    float *mine = host_state + (size_t)model.layer_begin * host_view.floats_per_layer;
    be->copy_to_host(be, mine, state.data, state.floats_per_slot * sizeof(float));
    for (int s = 1; s < sc.n_stages; s++) {
        const int b = grid.layer_begin[s], e = grid.layer_end[s];
        gather_floats(cli, &sc, s, host_state + (size_t)b * host_view.floats_per_layer, mine,
                      (size_t)(e - b) * host_view.floats_per_layer, "final state");
    }
    rp_state_tensors state_out;
    if (rp_state_tensors_alloc(&state_out, cfg, &err) != RP_OK) cli_fatal_error(cli, &err);
    rp_state_export(&host_view, 0, &state_out);
    rp_model grads;
    memset(&grads, 0, sizeof grads);
    float loss = 0.0f;
    if (want_grads) {
        /* Mean next-token cross-entropy from a zero state, without L2Wrap. */
        const int n = (int)T - 1;
        if (rp_model_alloc(&grads, cfg, model.layer_begin, model.layer_end, model.has_embed,
                           model.has_head, be, &err) != RP_OK)
            cli_fatal_error(cli, &err);
        loss = (float)(executor_grads(cli, &sc, &model, &grads, tokens, n, time_chunks, tbptt) / n);
    }
    if (sc.stage != 0) {
        /* Every stage sends its gradients; only rank 0 writes. */
        if (want_grads) {
            /* Through a host copy: the gradients may live on a GPU. */
            size_t most = grads.layer_floats > grads.head_floats ? grads.layer_floats
                                                                 : grads.head_floats;
            float *host = malloc(most * sizeof(float));
            if (!host) cli_fatal(cli, "out of memory for a layer's gradients");
            for (int i = 0; i < grads.layer_end - grads.layer_begin; i++) {
                be->copy_to_host(be, host, grads.layer_flat[i], grads.layer_floats * sizeof(float));
                gather_floats(cli, &sc, sc.stage, NULL, host, grads.layer_floats,
                              "layer gradients");
            }
            if (grads.has_head) {
                be->copy_to_host(be, host, grads.head_flat, grads.head_floats * sizeof(float));
                gather_floats(cli, &sc, sc.stage, NULL, host, grads.head_floats,
                              "head gradients");
            }
            free(host);
        }
        free(host_state);
        rp_state_tensors_free(&state_out);
        free(logits);
        free(tokens);
        rp_model_free(&grads);
        be->free(be, logits_dev);
        be->free(be, state.data);
        rp_workspace_free(&ws, be);
        rp_model_free(&model);
        rp_backend_destroy(be);
        rp_transport_free(&transport);
        rp_grid_free(&grid);
        return 0;
    }
    rp_st_writer w;
    rp_st_writer_init(&w);
    int64_t shape_t[1] = {(int64_t)T}, shape_tv[2] = {(int64_t)T, V};
    if (rp_st_writer_add(&w, "tokens", RP_DTYPE_I32, RP_DTYPE_I32, 1, shape_t, tokens, &err) ||
        rp_st_writer_add(&w, "logits", RP_DTYPE_F32, RP_DTYPE_F32, 2, shape_tv, logits, &err) ||
        rp_state_tensors_add(&state_out, &w, &err) ||
        rp_st_writer_add_meta(&w, "model", mo.model_path, &err) ||
        rp_st_writer_add_meta(&w, "mode", step_mode ? "step" : "sequence", &err))
        cli_fatal_error(cli, &err);
    /* Host views of the gradients, in official order (CPU memory is host). */
    float *grad_host = NULL;
    if (want_grads) {
        int64_t one = 1;
        if (rp_st_writer_add(&w, "loss", RP_DTYPE_F32, RP_DTYPE_F32, 1, &one, &loss, &err))
            cli_fatal_error(cli, &err);
        size_t total = (size_t)L * grads.layer_floats + grads.embed_floats + grads.head_floats;
        grad_host = cli_calloc(cli, total, sizeof(float), "the host gradient copy");
        float *embed_h = grad_host, *head_h = embed_h + grads.embed_floats;
        float *layers_h = head_h + grads.head_floats;
        be->copy_to_host(be, embed_h, grads.embed_flat, grads.embed_floats * sizeof(float));
        if (grads.has_head)
            be->copy_to_host(be, head_h, grads.head_flat, grads.head_floats * sizeof(float));
        rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
        rp_layer_layout(cfg, table);
        rp_global_layout(cfg, gtable, NULL, NULL);
        char name[256];
        for (int i = 0; i < RP_GLOBAL_N_TENSORS; i++) {
            const float *base = gtable[i].part == RP_PART_EMBED ? embed_h : head_h;
            if (rp_st_writer_add(&w, gtable[i].suffix, RP_DTYPE_F32, RP_DTYPE_F32, gtable[i].ndim,
                                 gtable[i].shape, base + gtable[i].flat_offset, &err))
                cli_fatal_error(cli, &err);
        }
        /* Stage order = layer order: stage s's layers, then its head (last). */
        for (int s = 1; s < sc.n_stages; s++) {
            for (int l = grid.layer_begin[s]; l < grid.layer_end[s]; l++)
                gather_floats(cli, &sc, s, layers_h + (size_t)l * grads.layer_floats, NULL,
                              grads.layer_floats, "layer gradients");
            if (s == last_stage)
                gather_floats(cli, &sc, s, head_h, NULL, grads.head_floats, "head gradients");
        }
        for (int l = 0; l < L; l++) {
            float *lh = layers_h + (size_t)l * grads.layer_floats;
            if (l < grads.layer_end)
                be->copy_to_host(be, lh, grads.layer_flat[l], grads.layer_floats * sizeof(float));
            for (int i = 0; i < RP_LAYER_N_TENSORS; i++) {
                rp_tensor_name(name, sizeof name, &table[i], l);
                if (rp_st_writer_add(&w, name, RP_DTYPE_F32, RP_DTYPE_F32, table[i].ndim,
                                     table[i].shape, lh + table[i].flat_offset, &err))
                    cli_fatal_error(cli, &err);
            }
        }
    }
    if (rp_st_writer_write(&w, out, &err)) cli_fatal_error(cli, &err);
    free(grad_host);
    rp_model_free(&grads);
    cli_info(cli, "wrote %s: logits [%zu, %d] and the state of %d layers (%s mode)", out, T, V,
             L, step_mode ? "step" : "sequence");
    rp_st_writer_free(&w);
    rp_state_tensors_free(&state_out);
    free(host_state);
    free(logits);
    free(tokens);
    be->free(be, logits_dev);
    be->free(be, state.data);
    rp_workspace_free(&ws, be);
    rp_model_free(&model);
    rp_backend_destroy(be);
    if (sc.n_stages > 1) {
        rp_transport_free(&transport);
        rp_grid_free(&grid);
    }
    return 0;
}
