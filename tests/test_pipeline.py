"""TextToImage's CPU decode (channels_last autoencoder, chunks) gives the plain decoder's images."""
import copy

import torch

from ldm.pipeline import CPU_DECODE_CHUNK, TextToImage, save_random_model


def test_cpu_decode_in_chunks_matches_plain_decode(tmp_path, one_thread):
    save_random_model(str(tmp_path), resolution=32)
    pipe = TextToImage.from_folder(str(tmp_path))
    reference = copy.deepcopy(pipe.autoencoder).to(memory_format=torch.contiguous_format)
    assert pipe.autoencoder.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(2 * CPU_DECODE_CHUNK + 3, *pipe.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
    images = pipe.decode(z)
    assert images.is_contiguous() and images.shape == (len(z), 3, 32, 32)
    torch.testing.assert_close(images, reference.decode_latents(z).clamp(-1, 1), atol=1e-5, rtol=1e-5)
