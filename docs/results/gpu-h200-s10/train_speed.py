"""Device diagnostic: `dski train` with INFO logs timestamped, so each epoch's time shows."""
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(name)s %(message)s", datefmt="%H:%M:%S",
                    stream=sys.stdout)
backbone, data, out, device, epochs, batch = sys.argv[1:7]
args = ["train", "--data", data, "--out", out, "--epochs", epochs, "--device", device, "--batch-size", batch,
        "--no-progress", "--overwrite", "--backbone", backbone]
if backbone != "dski-tiny":
    import open_clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model(backbone, pretrained=None, pretrained_image=False, pretrained_text=False)
    ckpt = Path(out + "-ckpt.pt")
    torch.save(clip.state_dict(), ckpt)
    args += ["--checkpoint", str(ckpt)]
from listener.cli import app

t0 = time.perf_counter()
try:
    app(args, prog_name="dski")
except SystemExit as exc:
    print(f"exit {exc.code}")
print(f"train total {time.perf_counter() - t0:.1f} s; peak GPU memory "
      f"{torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.2f} GiB")
