"""The test suite itself: it must not fill the disk of the machine it runs on."""


def test_setup_cfg_deletes_passing_tests_tmp_folders_and_keeps_one_session(pytestconfig):
    # A full run writes ~9 GB into tmp_path folders; with pytest's default ("all", 3 sessions)
    # CI's disk filled up with earlier runs' folders and every later test failed in setup.
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert int(pytestconfig.getini("tmp_path_retention_count")) <= 1


def test_every_library_imported_is_a_declared_requirement():
    """h5py (read by caption_attn) and Pillow (by the tests) were installed only because
    TensorFlow and Matplotlib pulled them in: a change of theirs would break a clean install
    with an ImportError."""
    import ast
    import configparser
    import os
    import re
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(root, "setup.cfg"))

    def names(value):   # "numpy>=2.4" -> "numpy"; configparser drops the comment lines
        return {re.split(r"[<>=!~\[; ]", line.strip())[0].lower()
                for line in value.splitlines() if line.strip()}
    package = names(cfg["options"]["install_requires"])
    test = package | names(cfg["options.extras_require"]["test"])
    distribution = {"cv2": "opencv-python-headless", "PIL": "pillow"}

    def imported(folder):
        local = {f[:-3] for f in os.listdir(os.path.join(root, folder)) if f.endswith(".py")}
        found = set()
        for name in os.listdir(os.path.join(root, folder)):
            if name.endswith(".py"):
                with open(os.path.join(root, folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        found |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        found.add(node.module.split(".")[0])
        return {distribution.get(m, m).lower() for m in found - local - {"caption_attn"}
                if m not in sys.stdlib_module_names}
    assert imported("caption_attn") - package == set()
    assert imported("tests") - test == set()
    assert {"h5py", "pillow"} <= imported("caption_attn") | imported("tests")
