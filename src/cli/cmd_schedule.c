/* rwkvpipe schedule: builds a pipeline schedule (src/pipe/schedule.c) for P
 * stages and M micro-batches, prints every stage's instruction list and the
 * simulated timeline with its bubble. No model, no MPI: a way to see what
 * the executor will do before launching it. */
#include <getopt.h>
#include <string.h>

#include "cli/cli.h"
#include "pipe/schedule.h"

/* Instruction lists wrap at this width. */
#define SCHEDULE_LINE_WIDTH 100

static void schedule_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe schedule --pp P --micro-batches M\n"
            "                         [--kind gpipe|1f1b|zb-h1|interleaved]\n"
            "                         [--virtual-stages V] [--fwd-cost X] [--bwd-cost Y] [--bwd-w-cost W]\n"
            "                         [--comm-cost Z]\n"
            "Prints the instruction list every stage of a P-stage pipeline runs for one\n"
            "optimizer step of M micro-batches, then the simulated timeline, the bubble\n"
            "fraction against the theory (P-1)/(M+P-1) and each stage's peak stash.\n"
            "  --pp P              pipeline stages (1..%d)\n"
            "  --micro-batches M   micro-batches per optimizer step (1..%d)\n"
            "  --kind K            gpipe (all forwards, then all backwards) or 1f1b\n"
            "                      (one forward, one backward; default) or zb-h1 (zero\n"
            "                      bubble: 1F1B with each backward split into its input\n"
            "                      gradient Bi and weight gradients W, W deferred) or\n"
            "                      interleaved (1F1B over V chunks of layers per stage,\n"
            "                      chunk c of stage s is model chunk c*P+s; M a multiple\n"
            "                      of P; bubble (P-1)/(V*M+P-1); the simulator only: train\n"
            "                      does not run it yet)\n"
            "  --virtual-stages V  chunks per stage for --kind interleaved (2..%d,\n"
            "                      default 2); costs are per chunk\n"
            "  --fwd-cost X        time of one forward on one stage (1)\n"
            "  --bwd-cost Y        time of one backward on one stage (1)\n"
            "  --bwd-w-cost W      the part of a backward that its weight gradients\n"
            "                      take in zb-h1 (half of --bwd-cost)\n"
            "  --comm-cost Z       time a send takes to arrive (0)\n"
            "  --time-chunks K     the time-chunk schedule: every K micro-batches are\n"
            "                      the chunks of one sequence (train --seq-len)\n"
            "  -h, --help          this text\n",
            RP_SCHEDULE_MAX_STAGES, RP_SCHEDULE_MAX_MICRO, RP_SCHEDULE_MAX_VIRTUAL);
}

/* "<A3" receive activations, "F3:1" forward into buffer 1, ">A3" send them;
 * "<G3", "B3:1", ">G3" the same for gradients; "Bi3:1" input gradient only
 * (BWD_B), "W3:1" its weight gradients (BWD_W); "<R3", "R3:1", ">R3" a
 * time chunk's recomputed forward (RECV_RECOMP, RECOMP, SEND_RECOMP). Interleaved: the micro-batch
 * is "3.c" on chunk c ("F3.1:0"). */
static void schedule_format_instr(const rp_pipe_instr *in, int interleaved, char *out,
                                  size_t size) {
    char m[32];
    if (interleaved) {
        snprintf(m, sizeof m, "%d.%d", in->micro_batch, in->chunk);
        switch (in->op) {
        case RP_OP_RECV_ACT: snprintf(out, size, "<A%s", m); return;
        case RP_OP_FWD: snprintf(out, size, "F%s:%d", m, in->buffer); return;
        case RP_OP_SEND_ACT: snprintf(out, size, ">A%s", m); return;
        case RP_OP_RECV_GRAD: snprintf(out, size, "<G%s", m); return;
        case RP_OP_BWD: snprintf(out, size, "B%s:%d", m, in->buffer); return;
        case RP_OP_SEND_GRAD: snprintf(out, size, ">G%s", m); return;
        default: break;
        }
    }
    switch (in->op) {
    case RP_OP_RECV_ACT: snprintf(out, size, "<A%d", in->micro_batch); break;
    case RP_OP_FWD: snprintf(out, size, "F%d:%d", in->micro_batch, in->buffer); break;
    case RP_OP_SEND_ACT: snprintf(out, size, ">A%d", in->micro_batch); break;
    case RP_OP_RECV_GRAD: snprintf(out, size, "<G%d", in->micro_batch); break;
    case RP_OP_BWD: snprintf(out, size, "B%d:%d", in->micro_batch, in->buffer); break;
    case RP_OP_SEND_GRAD: snprintf(out, size, ">G%d", in->micro_batch); break;
    case RP_OP_REDUCE_GRADS: snprintf(out, size, "REDUCE_GRADS"); break;
    case RP_OP_OPT_STEP: snprintf(out, size, "OPT_STEP"); break;
    case RP_OP_BWD_B: snprintf(out, size, "Bi%d:%d", in->micro_batch, in->buffer); break;
    case RP_OP_BWD_W: snprintf(out, size, "W%d:%d", in->micro_batch, in->buffer); break;
    case RP_OP_RECV_RECOMP: snprintf(out, size, "<R%d", in->micro_batch); break;
    case RP_OP_RECOMP: snprintf(out, size, "R%d:%d", in->micro_batch, in->buffer); break;
    case RP_OP_SEND_RECOMP: snprintf(out, size, ">R%d", in->micro_batch); break;
    case RP_OP_COUNT: snprintf(out, size, "?"); break;
    }
}

static void schedule_print_lists(const rp_schedule *s, FILE *out) {
    fprintf(out, "instructions (<A/>A receive/send activations, F/B forward/backward as "
                 "micro-batch:buffer, <G/>G receive/send gradients%s):\n",
            s->kind == RP_SCHEDULE_INTERLEAVED ? "; micro-batch.chunk" : "");
    for (int stage = 0; stage < s->n_stages; stage++) {
        fprintf(out, "stage %d (%d instructions, %d buffers):\n", stage, s->n_instr[stage],
                s->n_buffers[stage]);
        int column = 0;
        for (int i = 0; i < s->n_instr[stage]; i++) {
            char text[48];
            schedule_format_instr(&s->instr[stage][i], s->kind == RP_SCHEDULE_INTERLEAVED, text,
                                  sizeof text);
            int len = (int)strlen(text);
            if (column > 0 && column + 1 + len > SCHEDULE_LINE_WIDTH) {
                fprintf(out, "\n");
                column = 0;
            }
            column += fprintf(out, "%s%s", column == 0 ? "  " : " ", text);
        }
        fprintf(out, "\n");
    }
}

int cmd_schedule(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {{"pp", required_argument, 0, 'p'},
                                             {"micro-batches", required_argument, 0, 'm'},
                                             {"kind", required_argument, 0, 'k'},
                                             {"fwd-cost", required_argument, 0, 'f'},
                                             {"bwd-cost", required_argument, 0, 'b'},
                                             {"comm-cost", required_argument, 0, 'c'},
                                             {"bwd-w-cost", required_argument, 0, 'w'},
                                             {"time-chunks", required_argument, 0, 't'},
                                             {"virtual-stages", required_argument, 0, 'v'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    int n_stages = 0, n_micro = 0, n_chunks = 1, n_virtual = 0;
    rp_schedule_kind kind = RP_SCHEDULE_1F1B;
    rp_sim_costs costs = {1.0, 1.0, 0.0, 0.0};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'p': n_stages = (int)cli_parse_int(cli, "--pp", optarg, 1, RP_SCHEDULE_MAX_STAGES); break;
        case 'm':
            n_micro = (int)cli_parse_int(cli, "--micro-batches", optarg, 1, RP_SCHEDULE_MAX_MICRO);
            break;
        case 'k': {
            int k = rp_schedule_kind_from_name(optarg);
            if (k < 0)
                cli_fatal(cli, "--kind: '%s' is not a schedule: expected gpipe, 1f1b, zb-h1 or "
                          "interleaved", optarg);
            kind = (rp_schedule_kind)k;
            break;
        }
        /* the lower bound 1e-6 keeps a cost positive, which the simulator's
         * bubble fraction (busy / makespan) needs */
        case 'f': costs.fwd_cost = cli_parse_double(cli, "--fwd-cost", optarg, 1e-6, 1e6); break;
        case 'b': costs.bwd_cost = cli_parse_double(cli, "--bwd-cost", optarg, 1e-6, 1e6); break;
        case 'w': costs.bwd_w_cost = cli_parse_double(cli, "--bwd-w-cost", optarg, 1e-6, 1e6); break;
        case 'c': costs.comm_cost = cli_parse_double(cli, "--comm-cost", optarg, 0, 1e6); break;
        case 't':
            n_chunks = (int)cli_parse_int(cli, "--time-chunks", optarg, 1, RP_SCHEDULE_MAX_MICRO);
            break;
        case 'v':
            n_virtual = (int)cli_parse_int(cli, "--virtual-stages", optarg, 1,
                                           RP_SCHEDULE_MAX_VIRTUAL);
            break;
        case 'h': schedule_usage(stdout); return 0;
        default: schedule_usage(stderr); return 2;
        }
    }
    if (optind < argc) cli_fatal(cli, "unexpected argument '%s' (see --help)", argv[optind]);
    if (n_stages == 0) cli_fatal(cli, "--pp P is required: the number of pipeline stages");
    if (n_micro == 0) cli_fatal(cli, "--micro-batches M is required: micro-batches per step");
    if (n_virtual > 0 && kind != RP_SCHEDULE_INTERLEAVED)
        cli_fatal(cli, "--virtual-stages %d: only --kind interleaved has virtual stages",
                  n_virtual);
    if (kind == RP_SCHEDULE_INTERLEAVED && n_chunks > 1)
        cli_fatal(cli, "--time-chunks with --kind interleaved: time chunks run their own "
                  "schedule (leave out --kind)");
    if (kind == RP_SCHEDULE_INTERLEAVED && n_virtual == 0) n_virtual = 2;

    rp_error err;
    rp_schedule s;
    rp_sim_result r;
    rp_status built =
        n_chunks > 1 ? rp_schedule_build_time_chunks(&s, n_stages, n_micro, n_chunks, &err)
        : kind == RP_SCHEDULE_INTERLEAVED
            ? rp_schedule_build_interleaved(&s, n_stages, n_micro, n_virtual, &err)
            : rp_schedule_build(&s, kind, n_stages, n_micro, &err);
    if (built != RP_OK) cli_fatal_error(cli, &err);
    if (n_chunks > 1)
        printf("time chunks: micro-batches are %d sequence group(s) of %d chunks; backwards "
               "last chunk first\n", n_micro / n_chunks, n_chunks);
    if (rp_schedule_simulate(&s, &costs, &r, &err) != RP_OK) cli_fatal_error(cli, &err);
    if (kind == RP_SCHEDULE_INTERLEAVED)
        printf("schedule interleaved: %d stages x %d virtual stages (chunk c of stage s is model "
               "chunk c*%d+s), %d micro-batches; costs per chunk fwd %g, bwd %g, comm %g\n",
               n_stages, n_virtual, n_stages, n_micro, costs.fwd_cost, costs.bwd_cost,
               costs.comm_cost);
    else
        printf("schedule %s: %d stages, %d micro-batches; costs fwd %g, bwd %g, comm %g\n",
               rp_schedule_kind_name(kind), n_stages, n_micro, costs.fwd_cost, costs.bwd_cost,
               costs.comm_cost);
    schedule_print_lists(&s, stdout);
    printf("\n");
    rp_schedule_print_timeline(&s, &r, stdout);
    rp_sim_result_free(&r, s.n_stages);
    rp_schedule_free(&s);
    return 0;
}
