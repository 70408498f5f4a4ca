"""VL-CoT (SPEC §6): interleaved vision-language chains with a vision head, rejection-sampling tuning."""
