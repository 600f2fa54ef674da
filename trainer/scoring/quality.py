"""DNSMOS (Microsoft's no-reference speech quality predictor) from the ONNX models shipped in the
`speechmos` wheel, shared by the DNSMOS reward and the eval harness.

speechmos scores one clip at a time, one 9 s window per ONNX call; the models take a dynamic batch
dimension, so here the windows of every clip are stacked and scored in a few large calls. The windowing
and the polynomial calibration are speechmos's own (`DNSMOS.get_polyfit_val`, `audio_melspec`), so the
numbers match `speechmos.dnsmos.run`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.audio import resample

DNSMOS_SAMPLE_RATE = 16000
WINDOW_SECONDS = 9.01  # the models' fixed input length
HOP_SECONDS = 1.0


def dnsmos_reward(ovrl: np.ndarray) -> np.ndarray:
    """The seed's mapping (OVRL - 1) / 4 of a 1..5 MOS into [0, 1]."""
    return np.clip((np.asarray(ovrl) - 1.0) / 4.0, 0.0, 1.0)


class DNSMOS:
    """`score(waves, sr)` -> per clip {"sig", "bak", "ovrl"} (+ "p808" when asked), NaN for empty clips."""

    def __init__(self, personalized: bool = False, p808: bool = False, batch_size: int = 32) -> None:
        # lazy: DNSMOS (speechmos + onnxruntime) only when asked for
        import speechmos
        from speechmos.dnsmos import DNSMOS as SpeechmosDNSMOS

        root = Path(speechmos.__file__).parent
        primary = root / ("pdnsmos_models" if personalized else "dnsmos_models") / "sig_bak_ovr.onnx"
        self._model = SpeechmosDNSMOS(str(primary), str(root / "dnsmos_models" / "model_v8.onnx"))
        self.personalized = personalized
        self.p808 = p808
        self.batch_size = batch_size

    @staticmethod
    def _windows(wave: np.ndarray) -> list[np.ndarray]:
        length = int(WINDOW_SECONDS * DNSMOS_SAMPLE_RATE)
        if wave.size < length:  # speechmos tiles short clips up to one window
            wave = np.tile(wave, int(np.ceil(length / wave.size)))
        hops = int(np.floor(wave.size / DNSMOS_SAMPLE_RATE) - WINDOW_SECONDS) + 1
        hop = int(HOP_SECONDS * DNSMOS_SAMPLE_RATE)
        return [wave[i * hop : i * hop + length] for i in range(hops) if wave[i * hop :].size >= length]

    def score(self, waves: list[np.ndarray], sample_rate: int) -> list[dict[str, float]]:
        windows: list[np.ndarray] = []
        owners: list[int] = []
        for i, wave in enumerate(waves):
            if wave.size == 0:
                continue
            wave = np.clip(resample(wave, sample_rate, DNSMOS_SAMPLE_RATE), -1.0, 1.0)
            clip_windows = self._windows(wave)
            windows.extend(clip_windows)
            owners.extend([i] * len(clip_windows))
        keys = ["sig", "bak", "ovrl"] + (["p808"] if self.p808 else [])
        results = [dict.fromkeys(keys, float("nan")) for _ in waves]
        if not windows:
            return results
        raw = np.concatenate(
            [
                self._model.onnx_sess.run(None, {"input_1": np.stack(windows[s : s + self.batch_size])})[0]
                for s in range(0, len(windows), self.batch_size)
            ]
        )
        sig, bak, ovrl = self._model.get_polyfit_val(raw[:, 0], raw[:, 1], raw[:, 2], self.personalized)
        columns = {"sig": sig, "bak": bak, "ovrl": ovrl}
        if self.p808:
            mels = np.stack([self._model.audio_melspec(w[:-160]) for w in windows]).astype(np.float32)
            columns["p808"] = np.concatenate(
                [
                    self._model.p808_onnx_sess.run(None, {"input_1": mels[s : s + self.batch_size]})[0][:, 0]
                    for s in range(0, len(mels), self.batch_size)
                ]
            )
        owners_arr = np.asarray(owners)
        for i in np.unique(owners_arr):
            rows = owners_arr == i
            results[i] = {key: float(np.mean(values[rows])) for key, values in columns.items()}
        return results
