/* The fixture of the emulator's model-level tests (test_cuda_budget,
 * test_model_bytes): the tiny 2-layer C=128 model of tests/data on the CUDA
 * backend with its gradients, workspaces and recurrent state, and a training
 * step over token rows drawn from a salt, so both tests count the same step. */
#ifndef RP_TINY_FIXTURE_H
#define RP_TINY_FIXTURE_H

#include "backend.h"
#include "cuda_backend.h"
#include "model/backward.h"
#include "model/model.h"
#include "model/state.h"

/* The most rows and sequences a training step takes: its host arrays live on
 * the stack, so no heap block moves the emulated device buffers (whose
 * addresses decide the sectors test_model_bytes counts). */
#define TINY_FIXTURE_MAX_ROWS 256
#define TINY_FIXTURE_MAX_SEQS 8

typedef struct {
    rp_backend *be;
    rp_model model, grads;
    rp_workspace ws; /* the forward's (decode), for forward_rows > 0; else zero */
    rp_backward_workspace tw;
    rp_state state;
    int max_seqs;
} tiny_fixture;

/* The fixture in math `math`: the backward workspace for max_rows rows of up
 * to max_seqs sequences, the forward one for forward_rows (0: none), state
 * slots for max_seqs; gradients zero. NULL with the cause on stderr. */
tiny_fixture *tiny_fixture_create(rp_cuda_math math, int max_rows, int max_seqs,
                                  int forward_rows);
void tiny_fixture_destroy(tiny_fixture *f);

/* Zeroes every state slot (a step starts from it; apart from the step so a
 * caller can count the step alone). */
void tiny_fixture_zero_state(tiny_fixture *f);

/* One training step (forward + backward, no optimizer) over n_seq sequences
 * of len tokens from the state as it is, gradients added to f->grads; tokens
 * and targets from salt. Synchronizes, asserts success; returns the loss. */
double tiny_fixture_train_step(tiny_fixture *f, int n_seq, int len, int salt);

#endif
