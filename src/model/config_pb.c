/* rp_config -> ModelConfig (config_pb.h). */
#include "model/config_pb.h"

void rp_config_to_pb(const rp_config *c, Rwkvpipe__ModelConfig *pc) {
    rwkvpipe__model_config__init(pc);
    pc->arch = (char *)"rwkv7";
    pc->n_layer = (uint32_t)c->n_layer;
    pc->n_embd = (uint32_t)c->n_embd;
    pc->head_size = (uint32_t)c->head_size;
    pc->vocab_size = (uint32_t)c->vocab_size;
    pc->dim_ffn = (uint32_t)c->dim_ffn;
    pc->d_decay = (uint32_t)c->d_decay;
    pc->d_iclr = (uint32_t)c->d_iclr;
    pc->d_value = (uint32_t)c->d_value;
    pc->d_gate = (uint32_t)c->d_gate;
}
