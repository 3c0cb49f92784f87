"""A mutation check of the method tests: does the test suite notice the mistakes people make when
they implement DMD / DMD2 / ASE / Presto-L?

    python tests/mutants.py            # ~20 minutes on 2 cores; not run by pytest or CI
    python tests/mutants.py 3 7        # only mutants 3 and 7

Each mutant is a one-line bug. It is applied to a fresh copy of the repository in a temporary
folder (the working tree is never touched), the method tests run there, and the table says which
tests failed: `bug | caught by`. A bug that no test catches is printed as NOT CAUGHT, which is the
signal to write a test for it.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["tests/test_dmd.py", "tests/test_presto_s.py", "tests/test_layerdrop.py",
         "tests/test_edm.py", "tests/test_dit.py", "tests/test_train_sample.py",
         "tests/test_ae.py::test_a_round_trip_through_the_latent_is_the_autoencoders_own"]

# (bug, file, [(text as it is, text with the bug), ...]); each text must occur in the file
MUTANTS = [
    ("CFG applied to the fake score too", "dmd.py",
     [("lambda x, s: mu_fake(x, s, cond)", "edm.guided(mu_fake, cond, null, cfg_w)")]),
    ("real score evaluated without CFG (weight ignored)", "dmd.py",
     [("mu_real.encode(ids), null, cfg_w)", "mu_real.encode(ids), None, 1.0)")]),
    ("generator input sigma drawn from p_dmd", "dmd.py",
     [("return sample_sigma(cfg.p_gen, n", "return sample_sigma(cfg.p_dmd, n")]),
    ("fake score's DSM sigma drawn from p_gan", "dmd.py",
     [('draws["sigma_dsm"] = sample_sigma(distill.p_dsm', 'draws["sigma_dsm"] = sample_sigma(distill.p_gan')]),
    ("GAN sigma drawn from p_dsm", "dmd.py",
     [('draws["sigma_gan"] = sample_sigma(distill.p_gan', 'draws["sigma_gan"] = sample_sigma(distill.p_dsm')]),
    ("DMD gradient's sigma drawn from p_dsm", "dmd.py",
     [('"sigma_dmd": sample_sigma(distill.p_dmd', '"sigma_dmd": sample_sigma(distill.p_dsm')]),
    ("discriminator loss removed from the fake-score update (nu2 -> 0)", "dmd.py",
     [("return L_fake + nu2 * L_D,", "return L_fake + 0 * L_D,")]),
    ("nu1 and nu2 swapped", "train.py",
     [("distill.nu2, block, real_ids", "distill.NU_1, block, real_ids"), ("distill.nu1, block)", "distill.nu2, block)"),
      ("distill.NU_1, block, real_ids", "distill.nu1, block, real_ids")]),
    ("discriminator reads another block than the configured one", "dmd.py",
     [("edm.cat_cond(cond_real, cond), block)", "edm.cat_cond(cond_real, cond), block + 1)")]),
    ("real and generated GAN inputs noised with different noise", "gan.py",
     [("x_fake + s * eps", "x_fake - s * eps")]),
    ("DMD normaliser computed at the noised sample instead of x_hat", "dmd.py",
     [("norm = (x_hat - x0_real).abs()", "norm = (x_t - x0_real).abs()")]),
    ("L_G's gradient does not flow through the frozen fake network into G", "dmd.py",
     [("x_s = x_hat + edm.bcast(sigma, x_hat)", "x_s = x_hat.detach() + edm.bcast(sigma, x_hat)")]),
    ("L_G's gradient flows into the fake network (not frozen)", "train.py",
     [("mu_fake.requires_grad_(False)", "mu_fake.requires_grad_(True)")]),
    ("Presto-L's self-teacher target computed on other noise", "layerdrop.py",
     [("D_teacher = teacher(x_noisy, sigma, cond_teacher)",
       "D_teacher = teacher(x + edm.bcast(sigma, x) * torch.randn_like(x), sigma, cond_teacher)")]),
    ("budget embedding fed an off-by-one budget", "dit.py",
     [("c = c + self.budget_emb(budget)", "c = c + self.budget_emb(budget - 1)")]),
    ("Presto-L does not keep the final block", "layerdrop.py",
     [('if method == "ase" or b == depth:', "if True:")]),
    ("caption dropout missing in a stage that trains with CFG (base)", "train.py",
     [("ids = edm.drop_captions(ids, train_cfg.p_uncond, rng, data.Tokenizer.PAD)\n"
       "            sigma = edm.sample_p_train(ids.shape[0], cfg.edm, rng, device)\n"
       "            with autocast:\n                micro = edm.edm_loss(",
       "edm.drop_captions(ids, train_cfg.p_uncond, rng, data.Tokenizer.PAD)\n"
       "            sigma = edm.sample_p_train(ids.shape[0], cfg.edm, rng, device)\n"
       "            with autocast:\n                micro = edm.edm_loss(")]),
    ("caption dropout missing in a stage that trains with CFG (ASE / Presto-L)", "train.py",
     [("ids = edm.drop_captions(ids, train_cfg.p_uncond, rng, data.Tokenizer.PAD)  # CFG works",
       "edm.drop_captions(ids, train_cfg.p_uncond, rng, data.Tokenizer.PAD)  # CFG works")]),
    ("the GAN's real clips are G's own clips whatever distill.gan_real says", "train.py",
     [('separate = distill.gan_real == "independent"', "separate = False")]),
    ("the GAN's real clips conditioned on the generated clips' captions", "dmd.py",
     [("cond_real = cond if real_ids is None else mu_fake.encode(real_ids)", "cond_real = cond")]),
    ("the fake score's DSM loss on the real clips, not the generated ones", "dmd.py",
     [("L_fake = edm.edm_loss(mu_fake, x_hat, cond,", "L_fake = edm.edm_loss(mu_fake, x_real, cond,")]),
    ("the blocks' adaLN modulation not zero-initialised (adaLN-Zero lost)", "dit.py",
     [("nn.init.zeros_(blk.adaLN[-1].weight)", "pass")]),
    ("the autoencoder's decode does not undo the latent normalisation", "ae.py",
     [("decode(latent.float() / self.sigma_data * std + mean)", "decode(latent.float())")]),
]


def run(index, bug, file, edits):
    """Apply one mutant in a copy of the repository and return the names of the failing tests."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "repo")
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__",
                                                                  ".pytest_cache"))
        path = os.path.join(copy, file)
        text = open(path).read()
        for old, new in edits:
            if old not in text:
                return None                          # the code moved on: fix the mutant's text
            text = text.replace(old, new, 1)
        open(path, "w").write(text)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                            "-k", "not toy_mixture", *TESTS], cwd=copy, capture_output=True, text=True)
        return sorted(set(re.findall(r"^FAILED \S+::(\w+)", r.stdout, re.M)))


def main():
    chosen = [int(a) for a in sys.argv[1:]] or range(1, len(MUTANTS) + 1)
    print("| # | bug | caught by |\n|---|---|---|")
    for i in chosen:
        bug, file, edits = MUTANTS[i - 1]
        failed = run(i, bug, file, edits)
        caught = ("mutant text not found in " + file if failed is None else
                  ", ".join(f"`{t}`" for t in failed) or "**NOT CAUGHT**")
        print(f"| {i} | {bug} ({file}) | {caught} |", flush=True)


if __name__ == "__main__":
    main()
