/* Zero-shot scoring of a model on documented JSON-lines tasks (the standard
 * LM-evaluation formats, used by `rwkvpipe eval`):
 *   last word  {"text": "... word"}: the context is the text before its last
 *              space, the target " word"; the model reads [0] + context
 *              (token 0 = end of document first, as RWKV's LAMBADA script)
 *              and is right when greedy decoding reproduces every target token;
 *              perplexity = exp(mean over examples of -log p(target)).
 *   choice     {"context": "...", "choices": ["...", ...], "label": k}: each
 *              choice is scored by log p(choice | [0] + context) summed over its
 *              tokens; accuracy takes the best sum, accuracy_norm the best sum
 *              per byte of the choice (HellaSwag's acc_norm). */
#ifndef RP_TRAIN_SCORE_H
#define RP_TRAIN_SCORE_H

#include <stdio.h>

#include "text/tokenizer.h"
#include "model/model.h"

typedef enum { RP_SCORE_LAST_WORD = 0, RP_SCORE_CHOICE = 1 } rp_score_task;

typedef struct {
    long examples;
    double accuracy, accuracy_norm;   /* accuracy_norm: choice task only */
    double perplexity;                /* last-word task only */
} rp_score_result;

/* Scores every line of path. per_example (may be NULL) receives one line per
 * example: its index, the log-likelihood(s) and whether it was right. A
 * malformed line fails with "PATH:LINE: ...". */
rp_status rp_score_file(const rp_model *model, const rp_tokenizer *tok, rp_score_task task,
                        const char *path, FILE *per_example, rp_score_result *result,
                        rp_error *err);

#endif
