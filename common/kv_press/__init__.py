"""KV-cache compression ("presses") on the shared KV cache, with static shapes (issue 19).

memory.py   Memory (a KVCache + per-slot SlotInfo: position, frame id, kind, pinned, fresh,
            accumulated attention), Budget (M tokens over L layers, m per layer, or a compression
            ratio; shared or per kv head), Queries, and `apply_press`: score, keep the top
            entries, merge, compact.
presses.py  StreamMem, Oracle, FIFO, StreamingLLM, H2O, SnapKV, TOVA, KeyNorm, Uniform, Random,
            FramePool on one interface.
frames.py   StreamMem's input-frame filtering and frame-wise weighted merging.
"""
