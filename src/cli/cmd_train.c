/* rwkvpipe train: train an RWKV-7 model on token shards or an embedded
 * synthetic task, with the official optimizer recipe, in one process or
 * under mpirun as a grid of pipeline stages x data replicas
 * (docs/parallelism.md). */
#include <getopt.h>
#include <omp.h>
#include <signal.h>
#include <mpi.h>
#include <libgen.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cpu/cpu_backend.h"
#include "text/tokenizer.h"
#include "model/init.h"
#include "model/lora.h"
#include "pipe/grid.h"
#include "pipe/pipe_train.h"
#include "train/checkpoint.h"
#include "train/tokenize.h"
#include "train/trainer.h"

/* The stop request of a preempted job (Slurm's --signal, a Ctrl-C): the
 * trainer checks it between steps. A second SIGINT/SIGTERM gets the default
 * action (stop now, no checkpoint); SIGUSR1 never does, because schedulers
 * may deliver their warning twice (to the batch shell and to the tasks). */
static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int sig) {
    if (stop_signal && sig != SIGUSR1) {
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    if (!stop_signal) stop_signal = sig;
}

/* The trained model: one, or (interleaved) this stage's chunks, of which
 * model is a copy of the first. */
static void free_models(rp_model *model, rp_model *chunks, int n_virtual) {
    if (!chunks) {
        rp_model_free(model);
        return;
    }
    for (int c = 0; c < n_virtual; c++) rp_model_free(&chunks[c]);
    free(chunks);
}

/* Interleaved: which layers every stage holds (rank 0 prints it). */
static void print_chunk_map(FILE *out, const int *chunk_layers, int pp, int n_virtual,
                            int n_layer) {
    if (!out) return;
    fprintf(out, "interleaved: %d stages x %d chunks; model chunk k on stage k %% %d\n", pp,
            n_virtual, pp);
    for (int s = 0; s < pp; s++) {
        fprintf(out, "  stage %2d  layers", s);
        for (int c = 0; c < n_virtual; c++) {
            int b, e;
            rp_interleaved_chunk_layers(chunk_layers, pp, n_virtual, s, c, &b, &e);
            fprintf(out, "%s %d-%d", c ? "," : "", b, e - 1);
        }
        fprintf(out, "%s%s\n", s == 0 ? "  +embedding" : "",
                s == pp - 1 && n_layer > 0 ? "  +head/loss" : "");
    }
}

static void train_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe train [--model-config NAME | --init-from M.safetensors]\n"
            "                      [--data mqar|copy|SHARDS...] [options]\n"
            "Trains an RWKV-7 model and writes its weights. Defaults: the built-in 'tiny'\n"
            "model on the embedded multi-query associative recall task (no download).\n"
            "Model:\n"
            "  --model-config NAME  built-in shape for a new model (%s; default tiny)\n"
            "  --vocab-size V       its vocabulary size (default: the shape's, 256 for tiny)\n"
            "  --init-from FILE     start from these weights instead (safetensors)\n"
            "  --init-seed S        seed of the official init of a new model (default 1)\n"
            "Data:\n"
            "  --data SRC           'mqar' (default), 'copy', token shard files /\n"
            "                       directories made by 'rwkvpipe tokenize', or text /\n"
            "                       .jsonl files (tokenized first); repeatable\n"
            "  --vocab V            tokenizer for text --data: 'bytes' (default) or a\n"
            "                       World vocabulary file\n"
            "  --ctx-len T          tokens per sample (default 64)\n"
            "  --seq-len L          samples of L tokens (a multiple of T) trained as L/T\n"
            "                       time chunks of T that carry the recurrent state, full\n"
            "                       BPTT across them: the memory of T (default: T)\n"
            "  --tbptt              with --seq-len: no state gradient between chunks\n"
            "  --tune WHAT          'state': state tuning: train only each layer's initial\n"
            "                       WKV state (weights frozen, --init-from a model);\n"
            "                       needs --state-out\n"
            "  --state-out FILE     where --tune state writes the tuned states\n"
            "                       (blocks.L.att.time_state, loadable as a server session)\n"
            "  --tune lora          LoRA: W + (alpha/r) B A on the --lora-targets of every\n"
            "                       layer, base weights frozen (--init-from a model);\n"
            "                       needs --lora-out; -o writes the merged weights;\n"
            "                       checkpoints hold the base weights and the adapters\n"
            "  --lora-rank R        adapter rank (default 8)\n"
            "  --lora-alpha A       scale numerator: s = A / R (default: 2 R)\n"
            "  --lora-targets LIST  comma list of att.receptance, att.key, att.value,\n"
            "                       att.output, ffn.key, ffn.value (default: the four att)\n"
            "  --lora-out FILE      where --tune lora writes the adapters (safetensors,\n"
            "                       blocks.L.<target>.lora_A/B; serve --lora, merge-lora)\n"
            "  --mqar-pairs N       key-value pairs per MQAR sample (default: ctx/4)\n"
            "  --loss-on WHAT       synthetic tasks: 'answers' (default) or 'all' tokens\n"
            "  --seed S             data order and synthetic samples (default 1)\n"
            "Optimisation (official RWKV-7 recipe):\n"
            "  --steps N            optimizer steps of the run (default 200)\n"
            "  --tokens N           or: the run's length in tokens (steps = N / (batch x\n"
            "                       ctx), rounded up)\n"
            "  --stop-after N       stop after step N with a checkpoint (resume later)\n"
            "  --batch B            sequences per step (default 16)\n"
            "  --micro-batch M      sequences per forward/backward, B %% M == 0 (default B)\n"
            "  --lr X / --lr-final X  (default 6e-4 / 6e-5)\n"
            "  --warmup N           warmup steps (default 10)\n"
            "  --schedule S         cosine (default), linear or constant\n"
            "  --weight-decay X     on 2-D .weight matrices only (default 0)\n"
            "  --grad-clip X        global norm, 0 = off (default 1.0)\n"
            "  --no-l2wrap          switch off the L2Wrap logit penalty\n"
            "Output:\n"
            "  -o, --output FILE    write the trained weights here (safetensors)\n"
            "  --checkpoint-dir DIR checkpoints (weights, Adam moments, progress; see\n"
            "                       docs/checkpoints.md), DIR/latest and DIR/best\n"
            "  --checkpoint-interval N  save every N steps (default: only at the end)\n"
            "  --keep-last K        keep the newest K checkpoints (default 3; 0 = all)\n"
            "  --resume CKPT        continue a run from a checkpoint (directory or step\n"
            "                       directory): same model, data and --seed; --steps is the\n"
            "                       total, so the result equals one uninterrupted run;\n"
            "                       checkpoints continue in the same directory\n"
            "  --resume auto        continue from --checkpoint-dir's latest complete\n"
            "                       checkpoint if there is one, else start (for requeued jobs)\n"
            "Signals: SIGUSR1, SIGTERM or SIGINT stop the run after the current step, on\n"
            "every rank, with a checkpoint (when --checkpoint-dir is set); the exit status\n"
            "is then 75 (resume with --resume auto). A second SIGINT/SIGTERM stops at\n"
            "once, without a checkpoint; repeated SIGUSR1s count as one.\n"
            "  --metrics FILE       JSON lines: step, loss, lr, grad norm, tokens/s, eval\n"
            "  --eval-interval N    evaluate every N steps (default 50; always at the end)\n"
            "  --eval-batches N     micro-batches per evaluation (default 4)\n"
            "  --log-interval N     progress line every N steps (default 10)\n"
            "Parallelism (mpirun -np N rwkvpipe train ...; docs/parallelism.md):\n"
            "  --pp P               pipeline stages (default 1); the N ranks form P stages x\n"
            "                       N/P data replicas; --batch = replicas x micro-batches x\n"
            "                       --micro-batch\n"
            "  --stage-layers LIST  layers per stage, e.g. 4,4,3,1 (default: balanced by cost)\n"
            "  --pp-schedule K      1f1b (default), gpipe, zb-h1 (zero bubble: weight\n"
            "                       gradients deferred into the bubble, same weights) or\n"
            "                       interleaved (each stage holds v chunks of layers:\n"
            "                       model chunks s, P+s, 2P+s, ...; same weights; CPU)\n"
            "  --virtual-stages v   chunks per stage with interleaved (default 2); the\n"
            "                       micro-batches per step a multiple of P, v*P <= layers;\n"
            "                       --stage-layers then gives v*P counts, one per chunk\n"
            "  --zero 1             ZeRO-1: shard the Adam moments over the data replicas\n"
            "                       of each stage (same weights; CPU backend; default 0)\n"
            "  --halt-on-nan        stop at the first NaN/inf loss or gradient (default)\n"
            "  --no-halt-on-nan     skip such a step instead (weights and moments unchanged)\n"
            "  --log-dir DIR        per-rank logs DIR/rank-NNNNN.log (rank 0 also keeps\n"
            "                       printing progress on the terminal)\n"
            "  --comm-timeout S     fail when a stage waits S seconds on a peer (default 300;\n"
            "                       0 = never)\n"
            "  --threads N          CPU threads per rank (default: all cores / ranks on the\n"
            "                       node)\n"
            CLI_DEVICE_HELP
            "  -q, --quiet          no progress lines\n"
            "  -h, --help           this text\n",
            rp_config_builtin_names());
}

int cmd_train(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {
        {"model-config", required_argument, 0, 'c'}, {"vocab-size", required_argument, 0, 'V'},
        {"init-from", required_argument, 0, 'i'},    {"init-seed", required_argument, 0, 'I'},
        {"data", required_argument, 0, 'd'},         {"ctx-len", required_argument, 0, 'T'},
        {"mqar-pairs", required_argument, 0, 'p'},   {"loss-on", required_argument, 0, 'L'},
        {"seed", required_argument, 0, 's'},         {"steps", required_argument, 0, 'n'},
        {"batch", required_argument, 0, 'b'},        {"micro-batch", required_argument, 0, 'm'},
        {"lr", required_argument, 0, 'r'},           {"lr-final", required_argument, 0, 'R'},
        {"warmup", required_argument, 0, 'w'},       {"schedule", required_argument, 0, 'S'},
        {"weight-decay", required_argument, 0, 'D'}, {"grad-clip", required_argument, 0, 'G'},
        {"no-l2wrap", no_argument, 0, 'W'},          {"output", required_argument, 0, 'o'},
        {"metrics", required_argument, 0, 'M'},      {"eval-interval", required_argument, 0, 'e'},
        {"eval-batches", required_argument, 0, 'E'}, {"log-interval", required_argument, 0, 'l'},
        {"threads", required_argument, 0, 'j'},      {"quiet", no_argument, 0, 'q'},
        {"checkpoint-dir", required_argument, 0, 'C'},
        {"checkpoint-interval", required_argument, 0, 'K'},
        {"keep-last", required_argument, 0, 'k'},    {"resume", required_argument, 0, 'U'},
        {"stop-after", required_argument, 0, 'X'},  {"vocab", required_argument, 0, 'Y'},
        {"tokens", required_argument, 0, 'Z'},
        {"pp", required_argument, 0, 'P'},          {"stage-layers", required_argument, 0, 'A'},
        {"pp-schedule", required_argument, 0, 'B'}, {"comm-timeout", required_argument, 0, 'O'},
        {"halt-on-nan", no_argument, 0, 'H'},       {"no-halt-on-nan", no_argument, 0, 'N'},
        {"log-dir", required_argument, 0, 'g'},
        {"zero", required_argument, 0, 1017},
        {"virtual-stages", required_argument, 0, 1018},
        {"seq-len", required_argument, 0, 1003},    {"tbptt", no_argument, 0, 1004},
        {"tune", required_argument, 0, 1005},       {"state-out", required_argument, 0, 1006},
        {"lora-rank", required_argument, 0, 1007},  {"lora-alpha", required_argument, 0, 1008},
        {"lora-targets", required_argument, 0, 1009}, {"lora-out", required_argument, 0, 1010},
        {"device", required_argument, 0, 1001},     {"gpu-math", required_argument, 0, 1002},
        {"help", no_argument, 0, 'h'},               {0, 0, 0, 0}};
    rp_train_options o;
    rp_train_options_defaults(&o);
    o.keep_last = 3;
    o.progress = stderr;
    cli_model_options mo = {.config_name = "tiny", .init_seed = 1, .for_training = 1};
    const char **paths = cli_calloc(cli, (size_t)argc + 1, sizeof *paths, "the data paths");
    const char *vocab = "bytes";
    long long run_tokens = 0;
    int n_paths = 0, micro_batch_size = 0, pp = 1;
    const char *stage_layers = NULL, *log_dir = NULL;
    int n_virtual = 0;  /* --virtual-stages (interleaved only) */
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "ho:q", longopts, NULL)) != -1) {
        switch (c) {
        case 'c': mo.config_name = optarg; break;
        case 'V': mo.vocab_override = (int)cli_parse_int(cli, "--vocab-size", optarg, 4, 1 << 24); break;
        case 'i': mo.model_path = optarg; break;
        case 'I': mo.init_seed = cli_parse_u64(cli, "--init-seed", optarg); break;
        case 'd':
            rp_train_options_add_data(&o, paths, &n_paths, optarg);
            break;
        case 'T': o.ctx_len = (int)cli_parse_int(cli, "--ctx-len", optarg, 2, 1 << 20); break;
        case 'p': o.synth.n_pairs = (int)cli_parse_int(cli, "--mqar-pairs", optarg, 1, 1 << 20); break;
        case 'L':
            if (strcmp(optarg, "answers") == 0) o.loss_on_answers_only = 1;
            else if (strcmp(optarg, "all") == 0) o.loss_on_answers_only = 0;
            else cli_fatal(cli, "--loss-on: '%s' is not 'answers' or 'all'", optarg);
            break;
        case 's': o.seed = cli_parse_u64(cli, "--seed", optarg); break;
        case 'n': o.steps = (long)cli_parse_int(cli, "--steps", optarg, 1, 1LL << 40); break;
        case 'b': o.batch_size = (int)cli_parse_int(cli, "--batch", optarg, 1, 1 << 20); break;
        case 'm':
            micro_batch_size = (int)cli_parse_int(cli, "--micro-batch", optarg, 1, 1 << 20);
            break;
        case 'r': o.optim.lr_init = (float)cli_parse_double(cli, "--lr", optarg, 1e-12, 10); break;
        case 'R': o.optim.lr_final = (float)cli_parse_double(cli, "--lr-final", optarg, 0, 10); break;
        case 'w': o.optim.warmup_steps = (long)cli_parse_int(cli, "--warmup", optarg, 0, 1LL << 40); break;
        case 'S': {
            int s = rp_lr_schedule_from_name(optarg);
            if (s < 0) cli_fatal(cli, "--schedule: '%s' is not cosine, linear or constant", optarg);
            o.optim.schedule = (rp_lr_schedule)s;
            break;
        }
        case 'D': o.optim.weight_decay = (float)cli_parse_double(cli, "--weight-decay", optarg, 0, 10); break;
        case 'G': o.optim.grad_clip = (float)cli_parse_double(cli, "--grad-clip", optarg, 0, 1e9); break;
        case 'W': o.l2wrap = 0; break;
        case 'o': o.save_path = optarg; break;
        case 'M': o.metrics_path = optarg; break;
        case 'e': o.eval_interval = (long)cli_parse_int(cli, "--eval-interval", optarg, 0, 1LL << 40); break;
        case 'E': o.eval_batches = (int)cli_parse_int(cli, "--eval-batches", optarg, 1, 1 << 20); break;
        case 'l': o.log_interval = (long)cli_parse_int(cli, "--log-interval", optarg, 0, 1LL << 40); break;
        case 'j': mo.threads = (int)cli_parse_int(cli, "--threads", optarg, 1, 4096); break;
        case 1001: cli_parse_device(cli, &mo, optarg); break;
        case 1002: cli_parse_gpu_math(cli, &mo, optarg); break;
        case 1003: o.seq_len = (int)cli_parse_int(cli, "--seq-len", optarg, 2, 1 << 30); break;
        case 1004: o.tbptt = 1; break;
        case 1005:
            if (strcmp(optarg, "state") == 0) o.tune_state = 1;
            else if (strcmp(optarg, "lora") == 0) o.tune_lora = 1;
            else cli_fatal(cli, "--tune: '%s' is not 'state' or 'lora'", optarg);
            break;
        case 1006: o.state_out = optarg; break;
        case 1007: o.lora_rank = (int)cli_parse_int(cli, "--lora-rank", optarg, 1, 1 << 16); break;
        case 1008:
            o.lora_alpha = (float)cli_parse_double(cli, "--lora-alpha", optarg, 1e-6, 1e6);
            break;
        case 1009: {
            rp_error terr;
            if (rp_lora_parse_targets(optarg, &o.lora_targets, &terr) != RP_OK)
                cli_fatal(cli, "--lora-targets: %s", terr.msg);
            break;
        }
        case 1010: o.lora_out = optarg; break;
        case 'q': o.progress = NULL; break;
        case 'C': o.ckpt_dir = optarg; break;
        case 'K': o.ckpt_interval = (long)cli_parse_int(cli, "--checkpoint-interval", optarg, 0, 1LL << 40); break;
        case 'k': o.keep_last = (int)cli_parse_int(cli, "--keep-last", optarg, 0, 1 << 20); break;
        case 'U': o.resume_path = optarg; break;
        case 'Y': vocab = optarg; break;
        case 'Z': run_tokens = (long long)cli_parse_int(cli, "--tokens", optarg, 1, 1LL << 50); break;
        case 'X': o.stop_after = (long)cli_parse_int(cli, "--stop-after", optarg, 1, 1LL << 40); break;
        case 'P': pp = (int)cli_parse_int(cli, "--pp", optarg, 1, RP_GRID_MAX_STAGES); break;
        case 'A': stage_layers = optarg; break;
        case 'B': {
            int k = rp_schedule_kind_from_name(optarg);
            if (k < 0) cli_fatal(cli, "--pp-schedule: '%s' is not 1f1b, gpipe, zb-h1 or "
                                 "interleaved", optarg);
            o.pipe_schedule = (rp_schedule_kind)k;
            break;
        }
        case 'H': o.halt_on_nan = 1; break;
        case 'g': log_dir = optarg; break;
        case 'N': o.halt_on_nan = 0; break;
        case 'O': o.comm_timeout = cli_parse_double(cli, "--comm-timeout", optarg, 0, 1e9); break;
        case 1017: o.zero = (int)cli_parse_int(cli, "--zero", optarg, 0, 1); break;
        case 1018:
            n_virtual = (int)cli_parse_int(cli, "--virtual-stages", optarg, 2,
                                           RP_SCHEDULE_MAX_VIRTUAL);
            break;
        case 'h': train_usage(stdout); free(paths); return 0;
        default: train_usage(stderr); free(paths); return 2;
        }
    }
    if (optind < argc) cli_fatal(cli, "unexpected argument '%s'", argv[optind]);
    if (cli->mpi_size % pp != 0)
        cli_fatal(cli, "--pp %d does not divide the %d ranks: run with a multiple of the "
                  "pipeline depth (ranks = stages x data replicas)", pp, cli->mpi_size);
    const int dp = cli->mpi_size / pp;
    const int interleaved = o.pipe_schedule == RP_SCHEDULE_INTERLEAVED;
    if (n_virtual && !interleaved)
        cli_fatal(cli, "--virtual-stages is for --pp-schedule interleaved only");
    if (interleaved) {
        if (!n_virtual) n_virtual = 2;
        if (pp < 2)
            cli_fatal(cli, "--pp-schedule interleaved needs --pp 2 or more (it interleaves "
                      "chunks of layers across the stages)");
        if (o.seq_len > o.ctx_len)
            cli_fatal(cli, "--pp-schedule interleaved does not run --seq-len time chunks yet: "
                      "use --pp-schedule 1f1b with --seq-len, or drop --seq-len");
        o.n_virtual = n_virtual;
    }
    FILE *rank0_log = log_dir ? cli_open_rank_logs(cli, log_dir) : NULL;
    if (rank0_log && o.progress) o.progress = rank0_log;
    if (cli->mpi_rank != 0) o.progress = NULL;
    o.micro_batch_size = micro_batch_size ? micro_batch_size : o.batch_size;
    if (o.seq_len > 0 && o.seq_len % o.ctx_len != 0)
        cli_fatal(cli, "--seq-len %d must be a multiple of --ctx-len %d (the time chunk)",
                  o.seq_len, o.ctx_len);
    if (o.tune_state && !o.state_out)
        cli_fatal(cli, "--tune state needs --state-out FILE (where the tuned states go)");
    if (o.state_out && !o.tune_state)
        cli_fatal(cli, "--state-out needs --tune state");
    if (o.zero && (o.tune_state || o.tune_lora))
        cli_fatal(cli, "--zero 1 shards the weights' Adam moments and --tune %s trains no "
                  "weights: drop --zero", o.tune_state ? "state" : "lora");
    if (o.tune_state && o.tune_lora)
        cli_fatal(cli, "give one --tune (state or lora)");
    if (o.tune_lora && !o.lora_out)
        cli_fatal(cli, "--tune lora needs --lora-out FILE (where the adapters go)");
    if (!o.tune_lora && (o.lora_out || o.lora_rank || o.lora_alpha > 0 || o.lora_targets))
        cli_fatal(cli, "--lora-rank / --lora-alpha / --lora-targets / --lora-out need --tune lora");
    if (o.tune_lora) {
        if (!o.lora_rank) o.lora_rank = 8;
        if (!(o.lora_alpha > 0)) o.lora_alpha = 2.0f * o.lora_rank;
        if (!o.lora_targets) o.lora_targets = RP_LORA_DEFAULT_TARGETS;
    }
    if (o.tbptt && o.seq_len <= o.ctx_len)
        cli_fatal(cli, "--tbptt needs --seq-len longer than --ctx-len (time chunks)");
    if (run_tokens > 0) {
        long long per_step = (long long)o.batch_size * (o.seq_len > 0 ? o.seq_len : o.ctx_len);
        o.steps = (long)((run_tokens + per_step - 1) / per_step);
    }
    if (o.batch_size % (o.micro_batch_size * dp) != 0)
        cli_fatal(cli, "--batch %d must be a multiple of --micro-batch %d x %d data replica%s",
                  o.batch_size, o.micro_batch_size, dp, dp == 1 ? "" : "s");
    if (mo.threads == 0 && cli->mpi_size > 1) mo.threads = cli_threads_per_rank();
    rp_cli quiet = *cli;
    if (!o.progress) quiet.mpi_rank = -1;
    char tmp_dir[RP_CKPT_PATH_MAX] = "", tmp_prefix[RP_CKPT_PATH_MAX] = "";
    int n_tmp_shards = cli_tokenize_text_inputs(&quiet, paths, n_paths, vocab, tmp_dir,
                                            sizeof tmp_dir, tmp_prefix, sizeof tmp_prefix);
    n_paths = 0;
    while (paths[n_paths]) n_paths++;
    o.data_paths = paths;
    o.n_data_paths = n_paths;

    rp_backend *be;
    rp_model model;
    rp_error err;
    /* The config first (the partition needs it), then only this stage's part. */
    rp_config mcfg;
    const int resume_auto = o.resume_path && strcmp(o.resume_path, "auto") == 0;
    if (resume_auto) {
        if (!o.ckpt_dir) cli_fatal(cli, "--resume auto needs --checkpoint-dir");
        static char found[RP_CKPT_PATH_MAX];
        rp_error none;
        if (rp_ckpt_resolve(o.ckpt_dir, found, sizeof found, &none) == RP_OK) {
            o.resume_path = found;
        } else {
            o.resume_path = NULL;
            cli_info(&quiet, "--resume auto: no complete checkpoint in %s yet; starting a new run",
                     o.ckpt_dir);
        }
    }
    if (o.resume_path) {
        /* The checkpoint names the model; its weights are loaded by the trainer. */
        if (mo.model_path) cli_fatal(cli, "give either --resume or --init-from, not both");
        rp_ckpt_info info;
        if (rp_ckpt_read_info(o.resume_path, &info, &err) != RP_OK) cli_fatal_error(cli, &err);
        if (info.has_tuned != o.tune_state)
            cli_fatal(cli, info.has_tuned
                      ? "%s is a checkpoint of a state-tuning run: resume it with --tune state"
                      : "%s is not a checkpoint of a state-tuning run (it has no tuned states): "
                        "drop --tune state, or start the tuning with --init-from",
                      info.step_dir);
        if (info.has_lora != o.tune_lora)
            cli_fatal(cli, info.has_lora
                      ? "%s is a checkpoint of a LoRA run: resume it with --tune lora"
                      : "%s is not a checkpoint of a LoRA run (it has no adapters): drop "
                        "--tune lora, or start the tuning with --init-from",
                      info.step_dir);
        if (!info.has_moments)
            cli_fatal(cli, "%s holds weights only (no Adam moments): it cannot resume training; "
                      "start a new run with --init-from on its weights", info.step_dir);
        /* A checkpoint at or past the run's last step leaves nothing to
         * train: never a run of 0 steps with a made-up final loss and an -o
         * that merely copies the checkpoint. A requeued job that already
         * finished (--resume auto) is done, so that is exit 0; an explicit
         * --resume below the checkpoint's step is a mistake. */
        const long end_step = o.stop_after > 0 && o.stop_after < o.steps ? o.stop_after : o.steps;
        if (info.progress.step >= (uint64_t)end_step) {
            const char *bound = end_step == o.steps ? "--steps" : "--stop-after";
            if (!resume_auto)
                cli_fatal(cli, "%s is already at step %llu and %s is %ld: nothing to train; give "
                          "a larger --steps to continue that run (its weights are in %s)",
                          info.step_dir, (unsigned long long)info.progress.step, bound, end_step,
                          info.step_dir);
            cli_info(cli, "--resume auto: nothing to train: %s is at step %llu and %s is %ld, "
                     "so the run is complete%s%s (its weights are in %s)", info.step_dir,
                     (unsigned long long)info.progress.step, bound, end_step,
                     o.save_path ? "; not writing " : "", o.save_path ? o.save_path : "",
                     info.step_dir);
            if (n_tmp_shards) cli_remove_tokenized(tmp_dir, tmp_prefix, n_tmp_shards);
            if (rank0_log) fclose(rank0_log);
            free(paths);
            return 0;
        }
        /* Keep checkpointing where the run was checkpointing. */
        static char resume_dir[RP_CKPT_PATH_MAX];
        if (!o.ckpt_dir) {
            snprintf(resume_dir, sizeof resume_dir, "%s", info.step_dir);
            o.ckpt_dir = dirname(resume_dir);
        }
        mcfg = info.cfg;
    } else {
        cli_model_config(cli, &mo, &mcfg);
    }
    rp_grid grid;
    int layer_begin = 0, layer_end = mcfg.n_layer;
    /* Interleaved: the layers go to v*P model chunks, model chunk k on stage
     * k % P (the grid's own P-way split is unused). */
    int *chunk_layers = NULL;
    if (o.n_virtual) {
        const int n_chunks = o.n_virtual * pp;
        chunk_layers = malloc(sizeof(int) * (size_t)n_chunks);
        if (!chunk_layers) cli_fatal(cli, "out of memory");
        if (!stage_layers && mcfg.n_layer < n_chunks)
            cli_fatal(cli, "--pp %d x --virtual-stages %d = %d model chunks, but the model has "
                      "%d layers (a chunk needs one): lower --virtual-stages or --pp", pp,
                      o.n_virtual, n_chunks, mcfg.n_layer);
        if ((stage_layers ? rp_partition_parse(stage_layers, &mcfg, n_chunks, chunk_layers, &err)
                          : rp_partition_balanced(&mcfg, n_chunks, chunk_layers, &err)) != RP_OK)
            cli_fatal(cli, "%s%s", stage_layers ? "--stage-layers (one count per model chunk, "
                      "--pp x --virtual-stages of them): " : "", err.msg);
        o.chunk_layers = chunk_layers;
    }
    if (cli->mpi_size > 1) {
        cli_grid_create(cli, &mcfg, pp, o.n_virtual ? NULL : stage_layers, &grid);
        cli_set_stage(&quiet, grid.stage);
        layer_begin = grid.layer_begin[grid.stage];
        layer_end = grid.layer_end[grid.stage];
        if (o.n_virtual) {
            /* The grid's P-way split is not what the stages hold. */
            print_chunk_map(o.progress ? stderr : NULL, chunk_layers, pp, o.n_virtual,
                            mcfg.n_layer);
            rp_interleaved_chunk_layers(chunk_layers, pp, o.n_virtual, grid.stage, 0,
                                        &layer_begin, &layer_end);
        } else {
            rp_grid_print_map(&grid, o.progress ? stderr : NULL);
        }
        o.grid = &grid;
    } else if (stage_layers) {
        int one;
        if (rp_partition_parse(stage_layers, &mcfg, 1, &one, &err) != RP_OK)
            cli_fatal_error(cli, &err);
    }
    be = cli_backend_create(cli, &mo);
    /* --zero 1's save gathers the whole weights into host memory: the
     * model's backend when it is host memory, else a CPU backend of its own
     * (one thread: it only allocates and copies). */
    rp_backend *host_be = NULL;
    if (o.zero && !be->is_host_memory && !(host_be = rp_cpu_backend_create(1, &err)))
        cli_fatal_error(cli, &err);
    o.host_backend = host_be ? host_be : be;
    if (cli->mpi_size > 1)
        cli_rank_startup(cli, be, grid.stage, grid.replica, layer_begin, layer_end,
                         mo.threads ? mo.threads : omp_get_max_threads());
    rp_model *chunks = NULL;
    if (o.n_virtual) {
        /* This stage's chunks; `model` is chunk 0 (for the config and logs). */
        if (!(chunks = calloc((size_t)o.n_virtual, sizeof *chunks)))
            cli_fatal(cli, "out of memory");
        for (int ch = 0; ch < o.n_virtual; ch++) {
            int b, e;
            rp_interleaved_chunk_layers(chunk_layers, pp, o.n_virtual, grid.stage, ch, &b, &e);
            if (!o.resume_path) {
                cli_load_model_part(&quiet, &mo, &mcfg, b, e, be, &chunks[ch]);
                continue;
            }
            if (rp_model_alloc(&chunks[ch], &mcfg, b, e, b == 0, e == mcfg.n_layer, be, &err) !=
                RP_OK)
                cli_fatal_error(cli, &err);
            rp_model_register_weights(&chunks[ch]);
        }
        model = chunks[0];
        o.chunks = chunks;
    } else if (o.resume_path) {
        /* The weights come from the checkpoint, in rp_train_run. */
        if (rp_model_alloc(&model, &mcfg, layer_begin, layer_end, layer_begin == 0,
                           layer_end == mcfg.n_layer, be, &err) != RP_OK)
            cli_fatal_error(cli, &err);
        rp_model_register_weights(&model);  /* the checkpoint's weights refresh the copies */
    } else {
        cli_load_model_part(&quiet, &mo, &mcfg, layer_begin, layer_end, be, &model);
    }
    const rp_config *cfg = &model.cfg;
    cli_info(&quiet, "model: %d layers, C=%d, V=%d, %.2f M parameters; data: %s; %ld steps of "
             "%d x %d tokens (micro-batch %d); lr %g -> %g (%s, warmup %ld)",
             cfg->n_layer, cfg->n_embd, cfg->vocab_size, rp_config_param_count(cfg) / 1e6,
             o.synthetic ? rp_synth_task_name(o.synth.task) : "token shards", o.steps,
             o.batch_size, o.seq_len > 0 ? o.seq_len : o.ctx_len, o.micro_batch_size,
             o.optim.lr_init, o.optim.lr_final, rp_lr_schedule_name(o.optim.schedule),
             o.optim.warmup_steps);
    if (o.seq_len > o.ctx_len)
        cli_info(&quiet, "time chunks: each sample of %d tokens runs as %d chunks of %d, %s",
                 o.seq_len, o.seq_len / o.ctx_len, o.ctx_len,
                 o.tbptt ? "truncated BPTT (--tbptt)" : "full BPTT across chunks");
    rp_train_result res;
    stop_signal = 0;
    o.stop_signal = &stop_signal;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    rp_status st = rp_train_run(&model, &o, &res, &err);
    if (n_tmp_shards) cli_remove_tokenized(tmp_dir, tmp_prefix, n_tmp_shards);
    if (st == RP_ERR_DIVERGED && cli->mpi_size > 1 && cli->mpi_rank != 0) {
        /* Every rank found the same non-finite norm: rank 0 alone reports it
         * and ends the job; this rank waits to be ended with it. */
        cli_wait_for_job_end(cli);
    }
    if (st != RP_OK) cli_fatal_error(cli, &err);
    if (res.skipped_steps)
        cli_info(&quiet, "warning: %ld step%s skipped for a non-finite gradient",
                 res.skipped_steps, res.skipped_steps == 1 ? " was" : "s were");
    if (res.stopped_by_signal) {
        cli_info(&quiet, "stopped by signal %d (%s) after step %ld%s%s; continue with --resume "
                 "auto%s", res.stopped_by_signal, strsignal(res.stopped_by_signal),
                 res.steps_done, o.ckpt_dir ? "; checkpoint in " : " without a checkpoint (no "
                 "--checkpoint-dir)", o.ckpt_dir ? o.ckpt_dir : "",
                 o.ckpt_dir ? "" : " after adding --checkpoint-dir");
        free_models(&model, chunks, o.n_virtual);
        free(chunk_layers);
        rp_backend_destroy(host_be);
        rp_backend_destroy(be);
        if (o.grid) rp_grid_free(&grid);
        free(paths);
        return 75;  /* EX_TEMPFAIL: stopped early on purpose; resume later */
    }
    cli_info(&quiet, "done: %ld steps in %.1f s; final loss %.4f, eval loss %.4f, eval accuracy "
             "%.2f%%%s%s", res.steps_done, res.seconds, res.last_loss, res.eval_loss,
             100 * res.eval_accuracy, o.save_path ? "; weights: " : "",
             o.save_path ? o.save_path : "");
    free_models(&model, chunks, o.n_virtual);
    free(chunk_layers);
    rp_backend_destroy(host_be);
    rp_backend_destroy(be);
    if (o.grid) rp_grid_free(&grid);
    free(paths);
    if (rank0_log) fclose(rank0_log);
    return 0;
}
