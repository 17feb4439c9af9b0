// A MoE layer as the stages the disaggregated system puts on the wire, one
// file each:
//   1. gate           core/moe_gate.h       router logits -> experts and weights per token
//   2. dispatch plan  core/dispatch_plan.h  token-major assignments (an ExpertBatch)
//   3. expert compute core/expert_backend.h in-process CPU or GPU, or remote
//                                           expert servers (router_service/)
//   4. combine        core/combine.h        sum the weighted FFN rows in one fixed
//                                           order, add to the residual, count load
// Model::SubmitLayer runs 1-3 and Model::AwaitLayer 4 (core/model.cc), so that
// other micro-batches' attention overlaps stage 3. core/ffn_loader.h loads
// the FFNs a backend computes. This header includes the four stages.
#ifndef DMOE_CORE_MOE_H_
#define DMOE_CORE_MOE_H_

#include "core/combine.h"
#include "core/dispatch_plan.h"
#include "core/expert_backend.h"
#include "core/ffn_loader.h"
#include "core/moe_gate.h"

#endif  // DMOE_CORE_MOE_H_
