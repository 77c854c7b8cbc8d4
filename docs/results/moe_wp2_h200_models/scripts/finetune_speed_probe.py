import time, copy, torch, numpy as np
torch.set_num_threads(1)
from refgen.moe.train import load_model
from refgen.moe.data import load_dataset
from refgen.moe.export import deployable_from_info
from refgen.moe.finetune import finetune
from refgen.moe.qat import qat
model, info = load_model("/tmp/wp2/mnist_s17")
d = deployable_from_info(model, info)
ds = load_dataset("mnist", "/work/main/.carry/moe_cache")
x, y = ds.x_train[:3200], ds.y_train[:3200]
print("train", ds.x_train.shape, "test", ds.x_test.shape)
m = copy.deepcopy(d)
t = time.perf_counter(); finetune(m, x, y, 1, 1e-3, 64, 0); dt = time.perf_counter() - t
print(f"float finetune: {dt:.1f} s for 3200 -> {3200/dt:.0f} img/s, 54k epoch {54000/(3200/dt):.0f} s")
t = time.perf_counter(); qat(d, x, y, 1, 1e-4, 64, 0); dt = time.perf_counter() - t
print(f"qat 1 epoch incl prepare/convert: {dt:.1f} s for 3200 -> 54k epoch approx {54000/(3200/dt):.0f} s (upper)")
