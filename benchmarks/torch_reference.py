"""The reference PyTorch training steps of MAE and DINO at a config's shapes, for `paired_step.py`.

Not part of the library and never imported by it (ssl_ad's core does not import torch). The
models follow the official code with timm's ``Block`` / ``PatchEmbed`` (timm 1.0: fused
``F.scaled_dot_product_attention``, exact-erf GELU, LayerNorm eps 1e-6 as the references pass it):

* MAE, facebookresearch/mae ``models_mae.py`` ``MaskedAutoencoderViT``: patch embedding, fixed
  2-D sine-cosine positions (``util/pos_embed.py``), ``random_masking`` by per-sample noise +
  argsort + gather, CLS token, decoder (``decoder_embed``, mask tokens, un-shuffle gather,
  decoder blocks, ``decoder_pred``), ``forward_loss`` with ``norm_pix_loss``; AdamW (betas 0.9,
  0.95) on timm's weight-decay groups (``main_pretrain.py``); the per-iteration lr as
  ``util/lr_sched.adjust_learning_rate`` sets it (``engine_pretrain.py``).
* DINO, facebookresearch/dino ``vision_transformer.py`` ``VisionTransformer`` (CLS output,
  ``interpolate_pos_encoding`` for the local crops), ``DINOHead`` (MLP, L2-normalised bottleneck,
  weight-normalised last layer with g fixed at 1), ``utils.MultiCropWrapper`` (one backbone pass
  per crop resolution), ``main_dino.py`` ``DINOLoss`` (centre EMA), teacher = EMA of the student,
  ``utils.clip_gradients`` (per tensor), ``cancel_gradients_last_layer``, AdamW on
  ``utils.get_params_groups``, lr / wd / momentum set from the global iteration.

Data: the official transforms (torchvision, PIL bicubic ``RandomResizedCrop``, ``ColorJitter``
under ``RandomApply``, ``ToTensor``, ``Normalize``) with the config's values, through a
``torch.utils.data.DataLoader`` with ``--workers`` worker processes (persistent), batch size and
``drop_last`` as in the references.

Run as a worker by ``paired_step.py`` (one JSON spec line on stdin, then one line per
repetition: ``run <warmup> <steps>``; it answers one JSON line each). Images come as a ``.npy``
file of uint8 (N, H, W, C) written by the JAX side, so both read the same training images.
"""

from __future__ import annotations

import json
import math
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
import torchvision.transforms as T
from timm.layers import PatchEmbed  # the convert extra: torch 2.14.1, torchvision 0.29.1, timm 1.0.31
from timm.models.vision_transformer import Block
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # as models_mae.py / vision_transformer.py pass it
BICUBIC = T.InterpolationMode.BICUBIC


def sincos_2d(dim: int, grid: int, cls_token: bool) -> np.ndarray:
    """MAE ``util/pos_embed.get_2d_sincos_pos_embed``: (grid*grid [+1], dim), a zero CLS row first."""
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(dim // 2, gh), one(dim // 2, gw)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb.astype(np.float32)


class TorchMAE(nn.Module):
    """``models_mae.MaskedAutoencoderViT`` with timm blocks (qkv_bias=True)."""

    def __init__(self, img, patch, dim, depth, heads, ddim, ddepth, dheads, mlp_ratio=4.0, norm_pix_loss=True,
                 mask_ratio=0.75):
        super().__init__()
        self.patch, self.mask_ratio, self.norm_pix_loss = patch, mask_ratio, norm_pix_loss
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        n = self.patch_embed.num_patches
        grid = int(round(n**0.5))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(dim, grid, True))[None], requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                     for _ in range(depth)])
        self.norm = LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(ddim, grid, True))[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(ddim, dheads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                             for _ in range(ddepth)])
        self.decoder_norm = LayerNorm(ddim)
        self.decoder_pred = nn.Linear(ddim, patch**2 * 3)
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def patchify(self, imgs):
        p = self.patch
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p**2 * 3)

    def random_masking(self, x):
        n, length, d = x.shape
        len_keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward(self, imgs):
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


class DinoViT(nn.Module):
    """DINO's ``VisionTransformer`` (CLS output) with timm blocks and its ``interpolate_pos_encoding``."""

    def __init__(self, img, patch, dim, depth, heads, mlp_ratio=4.0):
        super().__init__()
        self.patch = patch
        self.patch_embed = PatchEmbed(img, patch, 3, dim, strict_img_size=False)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                     for _ in range(depth)])
        self.norm = LayerNorm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        class_pos_embed, patch_pos_embed = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch + 0.1, h // self.patch + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def forward(self, x):
        _, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class DINOHead(nn.Module):
    """``vision_transformer.DINOHead`` (no batch norm, ``norm_last_layer=True``)."""

    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.constant_(m.bias, 0)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """``utils.MultiCropWrapper``: one backbone pass per run of equal crop resolutions, then the head."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        idx_crops = torch.cumsum(torch.unique_consecutive(torch.tensor([inp.shape[-1] for inp in x]),
                                                          return_counts=True)[1], 0)
        start, output = 0, torch.empty(0)
        for end in idx_crops:
            output = torch.cat((output, self.backbone(torch.cat(x[start:end]))))
            start = end
        return self.head(output)


class DINOLoss(nn.Module):
    """``main_dino.DINOLoss`` at a constant teacher temperature (the demo's warm-up is 0 steps)."""

    def __init__(self, out_dim, ncrops, teacher_temp, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.ncrops, self.teacher_temp, self.student_temp = ncrops, teacher_temp, student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        total, n = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n += 1
        with torch.no_grad():
            batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total / n


def param_groups(model):
    """DINO ``utils.get_params_groups`` / timm ``param_groups_weight_decay``: no decay for biases and 1-d."""
    reg, not_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_reg if name.endswith(".bias") or len(p.shape) == 1 else reg).append(p)
    return [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]


def clip_gradients(model, clip):
    """DINO ``utils.clip_gradients``: each parameter's gradient norm capped at ``clip``."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)


def cosine(base, final, total, step, warmup=0, start_warmup=0.0):
    """DINO ``utils.cosine_scheduler`` at one iteration."""
    if step < warmup:
        return start_warmup + (base - start_warmup) * step / max(warmup, 1)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


class ImagesDataset(torch.utils.data.Dataset):
    """uint8 (N, H, W, C) images -> the transform of an RGB PIL image; endless (index modulo N)."""

    def __init__(self, images: np.ndarray, transform, length: int):
        self.images, self.transform, self.length = images, transform, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        img = self.images[i % len(self.images)]
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
        return self.transform(pil)


class DinoTransform:
    """``main_dino.DataAugmentationDINO`` with the config's values (flip, jitter, grayscale, blur, solarise)."""

    def __init__(self, s: dict):
        common = []
        if s["hflip"]:
            common.append(T.RandomHorizontalFlip(p=0.5))
        if s["color_jitter_p"] > 0:
            common.append(T.RandomApply([T.ColorJitter(*s["color_jitter"])], p=s["color_jitter_p"]))
        if s["grayscale_p"] > 0:
            common.append(T.RandomGrayscale(p=s["grayscale_p"]))
        norm = [T.ToTensor(), T.Normalize(s["mean"], s["std"])]

        def blur(p):
            return [T.RandomApply([T.GaussianBlur(5, tuple(s["blur_sigma"]))], p=p)] if p > 0 else []

        g = (s["global_size"], tuple(s["global_scale"]))
        self.global1 = T.Compose([T.RandomResizedCrop(g[0], scale=g[1], interpolation=BICUBIC), *common,
                                  *blur(s["global_blur"][0]), *norm])
        sol = [T.RandomSolarize(128, p=s["solarize_p"])] if s["solarize_p"] > 0 else []
        self.global2 = T.Compose([T.RandomResizedCrop(g[0], scale=g[1], interpolation=BICUBIC), *common,
                                  *blur(s["global_blur"][1]), *sol, *norm])
        self.local = T.Compose([T.RandomResizedCrop(s["local_size"], scale=tuple(s["local_scale"]),
                                                    interpolation=BICUBIC), *common, *blur(s["local_blur"]), *norm])
        self.num_local = s["num_local"]

    def __call__(self, image):
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.num_local)]


class Reference:
    """One method's reference model, optimiser and data loader; :meth:`run` times training steps."""

    def __init__(self, spec: dict):
        torch.manual_seed(0)
        torch.set_num_threads(int(spec["threads"]))
        self.spec = spec
        self.method = spec["method"]
        self.batch = int(spec["batch_size"])
        self.step = 0
        m = spec["model"]
        images = np.load(spec["images"])
        if self.method == "mae":
            mae = spec["mae"]
            self.model = TorchMAE(m["image_size"], m["patch_size"], m["width"], m["depth"], m["num_heads"],
                                  mae["decoder_width"], mae["decoder_depth"], mae["decoder_heads"], m["mlp_ratio"],
                                  mae["norm_pix_loss"], mae["mask_ratio"])
            d = spec["data"]
            crop = [T.RandomResizedCrop(m["image_size"], scale=tuple(d["crop_scale"]), interpolation=BICUBIC)]
            flip = [T.RandomHorizontalFlip()] if d["hflip"] else []
            transform = T.Compose(crop + flip + [T.ToTensor(), T.Normalize(d["mean"], d["std"])])
            params = param_groups(self.model)
        else:
            dino = spec["dino"]
            self.student = MultiCropWrapper(
                DinoViT(m["image_size"], m["patch_size"], m["width"], m["depth"], m["num_heads"], m["mlp_ratio"]),
                DINOHead(m["width"], dino["out_dim"], dino["num_layers"], dino["hidden_dim"], dino["bottleneck_dim"]))
            self.teacher = MultiCropWrapper(
                DinoViT(m["image_size"], m["patch_size"], m["width"], m["depth"], m["num_heads"], m["mlp_ratio"]),
                DINOHead(m["width"], dino["out_dim"], dino["num_layers"], dino["hidden_dim"], dino["bottleneck_dim"]))
            self.teacher.load_state_dict(self.student.state_dict())
            for p in self.teacher.parameters():
                p.requires_grad = False
            self.loss_fn = DINOLoss(dino["out_dim"], 2 + spec["data"]["num_local"], dino["teacher_temp"],
                                    dino["student_temp"], dino["center_momentum"])
            transform = DinoTransform(spec["data"])
            params = param_groups(self.student)
            self.model = self.student
        o = spec["optim"]
        self.lr = o["base_lr"] * self.batch / 256
        self.opt = torch.optim.AdamW(params, lr=self.lr, betas=(o["b1"], o["b2"]), weight_decay=o["weight_decay"])
        dataset = ImagesDataset(images, transform, length=10**9)
        workers = int(spec["workers"])
        self.loader = iter(torch.utils.data.DataLoader(
            dataset, batch_size=self.batch, shuffle=False, sampler=torch.utils.data.RandomSampler(
                dataset, replacement=True, num_samples=10**9), num_workers=workers, drop_last=True,
            persistent_workers=workers > 0))

    def train_step(self, batch) -> float:
        o, total = self.spec["optim"], int(self.spec["total_steps"])
        it = self.step
        lr = cosine(self.lr, o["min_lr"], total, it, o["warmup_steps"])
        wd = cosine(o["weight_decay"], o["weight_decay_end"], total, it)
        for i, g in enumerate(self.opt.param_groups):
            g["lr"] = lr
            if i == 0:
                g["weight_decay"] = wd
        if self.method == "mae":
            loss = self.model(batch)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        else:
            teacher_out = self.teacher(batch[:2])
            student_out = self.student(batch)
            loss = self.loss_fn(student_out, teacher_out)
            self.opt.zero_grad()
            loss.backward()
            if o["clip_norm"]:
                clip_gradients(self.student, o["clip_norm"])
            if it < int(o["freeze_steps"] or 0):
                for n, p in self.student.named_parameters():
                    if "last_layer" in n:
                        p.grad = None
            self.opt.step()
            with torch.no_grad():
                mom = cosine(self.spec["dino"]["momentum_teacher"], 1.0, total, it)
                for pq, pk in zip(self.student.parameters(), self.teacher.parameters()):
                    pk.data.mul_(mom).add_((1 - mom) * pq.detach().data)
        self.step += 1
        return float(loss.item())

    def run(self, warmup: int, steps: int) -> dict:
        """``warmup`` untimed then ``steps`` timed training steps (data loading included): images/s."""
        self.model.train()
        for _ in range(warmup):
            self.train_step(next(self.loader))
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.train_step(next(self.loader))
        seconds = time.perf_counter() - t0
        return {"images_per_s": steps * self.batch / seconds, "seconds": seconds, "loss": loss}


def worker() -> None:
    """stdin: one JSON spec line, then ``run <warmup> <steps>`` lines; stdout: one JSON line each."""
    spec = json.loads(sys.stdin.readline())
    ref = Reference(spec)
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "run":
            break
        print(json.dumps(ref.run(int(words[1]), int(words[2]))), flush=True)


if __name__ == "__main__":
    worker()
