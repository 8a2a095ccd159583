"""The NF4 code (QLoRA's 16 normal-float values) and its block size, shared by quant/nf4.py and the C
kernel's loader (quant/native.py), which checks the kernel against them."""

BLOCK_SIZE = 64  # values per absmax, as QLoRA and bitsandbytes' default
# the 16 NF4 values of QLoRA (Dettmers et al., 2023, appendix E), as bitsandbytes' get_4bit_type("nf4")
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
