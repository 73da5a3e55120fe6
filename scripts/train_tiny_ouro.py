"""Train a tiny Ouro on the `addition` task on a CPU (minutes on 2 cores) and save it with its
byte tokenizer, as the teacher for the small-scale MELT conversion proof.

    python scripts/train_tiny_ouro.py --data-dir results/tiny-addition --out results/tiny-ouro
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from melt_bench.evaluation.byte_tokenizer import byte_tokenizer
from melt_bench.models import OuroConfig, OuroForCausalLM
from melt_bench.training.convert import ConvertConfig, load_texts, packed_batch


def encode(tokenizer, row: dict) -> tuple[list[int], int]:
    """Token ids of 'Question: q\\nAnswer: #### n\\n' and where the answer starts."""
    prompt = tokenizer(f"Question: {row['question']}\nAnswer:").input_ids
    answer = tokenizer(f" {row['answer']}\n").input_ids
    return prompt + answer, len(prompt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)  # 3e-3 leaves 4 loops underfit
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pack-to", type=int, default=None,
                        help="train on sequences of N tokens packed with problems (EOS between them), as "
                        "melt-bench convert --pack-to packs them (default: one problem per row)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = byte_tokenizer()
    rows = [json.loads(line) for line in (args.data_dir / "addition" / "train.jsonl").read_text().splitlines()]
    encoded = [encode(tokenizer, row) for row in rows]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)  # loss on the answer only
    for i, (seq, start) in enumerate(encoded):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, start : len(seq)] = True
    config = OuroConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                        head_dim=args.hidden // 4, max_position_embeddings=max(256, args.pack_to or 0),
                        rope_theta=10_000.0,
                        total_ut_steps=args.loops)
    model = OuroForCausalLM(config).train()
    texts = load_texts(str(args.data_dir / "addition" / "train.jsonl"))
    packing = ConvertConfig(source="", out="", data="", pack_to=args.pack_to, batch_size=args.batch_size,
                            seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for step in range(args.steps):
        if args.pack_to:
            packed = packed_batch(tokenizer, texts, packing, step)
            batch, target_mask = packed.ids, packed.targets
            target_mask = torch.cat([torch.zeros_like(target_mask[:, :1]), target_mask[:, :-1]], dim=1)  # at the token
        else:
            pick = torch.randint(0, len(ids), (args.batch_size,), generator=generator)
            batch, target_mask = ids[pick], mask[pick]
        logits = model(batch, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits[target_mask[:, 1:]], batch[:, 1:][target_mask[:, 1:]])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
