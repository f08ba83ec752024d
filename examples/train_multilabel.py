"""Train a small CNN on synthetic multi-label shapes with a CSRA head and with the usual
global-average-pool + linear head (same trunk, data, schedule and budget), and compare mAP.

    python examples/train_multilabel.py                  # defaults: under 2 minutes on a CPU
    python examples/train_multilabel.py --train 200 --test 100 --epochs 1   # a smoke run
    python examples/train_multilabel.py --save model.pt  # keep the CSRA model (for the maps demo)

The data (csra_triton.tools.demo.make_shapes) are 32x32 images with 1-3 of five coloured shapes at
random places; the label is the set of shapes present. On CPU tensors the head runs csra-triton's
PyTorch fallback (the Triton kernels run on CUDA).
"""
import argparse
import sys
import time

import torch

from csra_triton.tools.demo import Classifier, evaluate, make_shapes, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=6000, help="training images")
    ap.add_argument("--test", type=int, default=1000, help="held-out images")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--heads", type=int, default=1, help="CSRA heads (official VOC setting: 1)")
    ap.add_argument("--lam", type=float, default=0.1, help="CSRA lambda (official VOC: 0.1)")
    ap.add_argument("--lr", type=float, default=0.02, help="trunk learning rate (head: 10x)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--save", default=None, help="save the trained CSRA model's state_dict here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train_set = make_shapes(args.train, seed=args.seed)
    test_set = make_shapes(args.test, seed=args.seed + 1)
    results = {}
    for head in ("csra", "gap-linear"):
        torch.manual_seed(args.seed)  # same trunk initialisation for both heads
        model = Classifier("csra" if head == "csra" else "gap", heads=args.heads, lam=args.lam)
        print(f"training with the {head} head")
        secs = train(model, train_set, epochs=args.epochs, lr=args.lr, seed=args.seed, log=print)
        results[head] = (evaluate(model, test_set), secs)
        if head == "csra" and args.save:
            torch.save({"state_dict": model.state_dict(), "heads": args.heads, "lam": args.lam},
                       args.save)
            print(f"saved {args.save}")
    print(f"\n{args.train} training / {args.test} held-out images, {args.epochs} epochs, "
          f"CSRA heads={args.heads} lam={args.lam}, total {time.perf_counter() - t0:.0f} s")
    print("| head | held-out mAP (%) | training s |")
    print("|---|---|---|")
    for head, (m_ap, secs) in results.items():
        print(f"| {head} | {m_ap:.2f} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
