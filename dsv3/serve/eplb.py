"""Expert-parallel load balancer: redundant experts and their placement (paper §3.4).

§3.4 serves MoE layers with *redundant experts*: the heaviest-loaded experts (load estimated from
statistics collected online) get extra replicas, and the replicas are packed onto GPUs so that GPU loads
are even, without adding cross-node traffic. This module is that planner, with the interface of DeepSeek's
public EPLB (`rebalance_experts`, same arguments, shapes, dtypes and semantics), written from its
description:

- Hierarchical policy (used when `num_groups % num_nodes == 0`, the prefilling case): 1) pack the expert
  *groups* onto nodes, each node getting the same number of groups and loads as even as possible (so the
  group-limited routing of §2.1.2 keeps a token's traffic within few nodes); 2) inside each node,
  replicate experts into the node's share of physical slots, each new replica going to the expert with
  the largest load per replica; 3) pack the node's physical experts (load = expert load / replicas) onto
  its GPUs, the same number per GPU, heaviest first onto the lightest GPU that still has room.
- Global policy (otherwise, the decoding case with a larger EP size): the same with one group on one
  node, i.e. replicate over all experts and pack onto all GPUs.
- Physical experts are numbered GPU-major: GPU g holds physical slots [g*P/G, (g+1)*P/G).
  `phy2log[l, p]` is the logical expert in slot p, `log2phy[l, e, r]` the slot of replica r of expert e
  (-1 past `logcnt[l, e]`), `logcnt[l, e]` its number of replicas. All int64.
- Ties: items of equal load are taken in the order of torch's descending `sort` (what the public EPLB
  does, so both give identical plans, log2phy's replica order included), then the first lightest pack
  and the first expert of maximal load per replica.
"""

from __future__ import annotations

import torch


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the n items of each row into `num_packs` packs of n/num_packs items with loads as even as the
    greedy allows (heaviest item first, into the lightest pack not yet full).
    weight [X, n] -> (pack [X, n], rank_in_pack [X, n]), int64."""
    X, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items cannot be split evenly into {num_packs} packs")
    cap = n // num_packs
    if cap == 1:  # one item per pack: item i is pack i
        return torch.arange(n).expand(X, n).clone(), torch.zeros(X, n, dtype=torch.int64)
    order = weight.float().sort(dim=-1, descending=True).indices.tolist()
    rows = weight.double().tolist()
    pack = torch.empty(X, n, dtype=torch.int64)
    rank = torch.empty(X, n, dtype=torch.int64)
    for x in range(X):
        load, filled = [0.0] * num_packs, [0] * num_packs
        for item in order[x]:
            p = min((q for q in range(num_packs) if filled[q] < cap), key=load.__getitem__)
            pack[x, item], rank[x, item] = p, filled[p]
            load[p] += rows[x][item]
            filled[p] += 1
    return pack, rank


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give `num_phy - num_log` extra replicas, one at a time, to the expert with the largest load per
    replica (this greedy minimises the maximal load per replica).
    weight [X, num_log] -> (phy2log [X, num_phy], replica rank [X, num_phy], logcnt [X, num_log])."""
    X, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"{num_phy} physical experts cannot hold {num_log} logical experts")
    phy2log = torch.arange(num_phy).repeat(X, 1)
    replica = torch.zeros(X, num_phy, dtype=torch.int64)
    logcnt = torch.ones(X, num_log, dtype=torch.int64)
    rows = torch.arange(X)
    for slot in range(num_log, num_phy):
        e = (weight / logcnt).argmax(-1)  # first maximum
        phy2log[:, slot] = e
        replica[:, slot] = logcnt[rows, e]
        logcnt[rows, e] += 1
    return phy2log, replica, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a batch of permutations [X, n]."""
    inv = torch.empty_like(perm)
    return inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm).contiguous())


def _hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    """weight [L, E] fp32 -> (phy2log [L, P], replica rank [L, P], logcnt [L, E])."""
    L, E = weight.shape
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    phy_per_gpu, log_per_node = num_phy // num_gpus, E // num_nodes

    # 1) expert groups -> nodes. "mlog" numbers experts node by node: node n holds mlog [n*E/N, (n+1)*E/N)
    group_pack, group_rank = balanced_packing(weight.view(L, num_groups, group_size).sum(-1), num_nodes)
    first_mlog = (group_pack * groups_per_node + group_rank) * group_size          # [L, groups]
    log2mlog = (first_mlog.unsqueeze(-1) + torch.arange(group_size)).flatten(1)      # [L, E]
    mlog2log = _inverse(log2mlog)

    # 2) replicas inside each node: one row per (layer, node)
    node_w = weight.gather(-1, mlog2log).view(L * num_nodes, log_per_node)
    phy2mlog, replica, mlogcnt = replicate_experts(node_w, num_phy // num_nodes)   # [L*N, P/N]

    # 3) the node's physical experts -> its GPUs, by load per replica
    per_replica = (node_w / mlogcnt).gather(-1, phy2mlog)
    gpu, slot = balanced_packing(per_replica, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu * phy_per_gpu + slot)                                   # placed slot -> replica
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (pphy2mlog.view(L, num_nodes, -1)
                 + (torch.arange(num_nodes) * log_per_node).view(1, -1, 1)).flatten(1)  # node-local -> global
    phy2log = mlog2log.gather(-1, pphy2mlog)
    phy_rank = replica.gather(-1, pphy2phy).view(L, -1)
    logcnt = mlogcnt.view(L, -1).gather(-1, log2mlog)
    return phy2log, phy_rank, logcnt


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan redundant experts and their placement (§3.4), DeepSeek EPLB's interface.

    weight [layers, num_logical_experts]: estimated load of each expert (e.g. tokens routed to it).
    num_replicas: physical experts per layer (logical + redundant), a multiple of num_gpus.
    num_groups: expert groups of group-limited routing; num_nodes: server nodes; num_gpus: all GPUs
    (a multiple of num_nodes). Returns int64 tensors
      phy2log [layers, num_replicas]: logical expert of each physical slot (GPU g owns a contiguous block),
      log2phy [layers, num_logical_experts, max replicas]: the slots of each expert, -1 padded,
      logcnt  [layers, num_logical_experts]: replicas per expert.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, num_logical_experts], got shape {tuple(weight.shape)}")
    L, E = weight.shape
    if min(num_groups, num_nodes, num_gpus) < 1:
        raise ValueError(f"num_groups, num_nodes and num_gpus must be >= 1, got {num_groups}, {num_nodes}, {num_gpus}")
    if num_replicas < E:
        raise ValueError(f"num_replicas={num_replicas} < number of logical experts {E}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}")
    if E % num_groups:
        raise ValueError(f"{E} logical experts do not split into num_groups={num_groups} groups")
    w = weight.detach().float().cpu()
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weight must hold finite, non-negative expert loads")
    if num_groups % num_nodes == 0:
        if E % num_nodes:
            raise ValueError(f"{E} experts do not split over num_nodes={num_nodes}")
        phy2log, phy_rank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:  # global policy: one group, one node
        phy2log, phy_rank, logcnt = _hierarchical(w, num_replicas, 1, 1, num_gpus)
    width = int(logcnt.max())
    log2phy = torch.full((L, E * width), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * width + phy_rank, torch.arange(num_replicas).expand(L, -1).contiguous())
    return phy2log, log2phy.view(L, E, width), logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Expected load of each GPU [layers, num_gpus] when an expert's tokens split evenly over its replicas."""
    w = weight.double()
    per_slot = (w / logcnt).gather(-1, phy2log)
    return per_slot.view(w.shape[0], num_gpus, -1).sum(-1)


def imbalance(rank_load: torch.Tensor) -> torch.Tensor:
    """max / mean load over the ranks of each layer (1 = perfectly balanced): [layers, ranks] -> [layers]."""
    rank_load = rank_load.double()
    return rank_load.max(-1).values / rank_load.mean(-1).clamp(min=1e-12)


def default_placement(num_layers: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """No redundancy, expert e in slot e (the plain E/EP contiguous sharding): (phy2log, log2phy, logcnt)."""
    phy2log = torch.arange(num_experts).repeat(num_layers, 1)
    return phy2log, phy2log.unsqueeze(-1).clone(), torch.ones(num_layers, num_experts, dtype=torch.int64)
