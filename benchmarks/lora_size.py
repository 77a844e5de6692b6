"""Parameters of a rank-r LoRA on SD 1.5's UNet attention projections (meta device, no weights)."""
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from peft import LoraConfig
with init_empty_weights():
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8)
    base = sum(p.numel() for p in unet.parameters())
    for r in (4, 16, 64):
        unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=f"r{r}")
    for r in (4, 16, 64):
        n = sum(p.numel() for name, p in unet.named_parameters() if f".r{r}." in name)
        print(f"rank {r}: {n/1e6:.2f}M parameters, {n*2/2**20:.1f} MiB fp16, {n*4/2**20:.1f} MiB fp32 (UNet {base/1e6:.1f}M)")
