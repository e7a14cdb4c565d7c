/* The model shape as the ModelConfig protobuf message (proto/rwkvpipe.proto),
 * as checkpoint manifests and session files record it. */
#ifndef RP_MODEL_CONFIG_PB_H
#define RP_MODEL_CONFIG_PB_H

#include "model/config.h"
#include "rwkvpipe.pb-c.h"

/* Initialises pc from c (pc->arch points to a static string). */
void rp_config_to_pb(const rp_config *c, Rwkvpipe__ModelConfig *pc);

#endif
