"""The test suite itself: it must not fill the disk of the machine it runs on."""


def test_setup_cfg_deletes_passing_tests_tmp_folders_and_keeps_one_session(pytestconfig):
    # A full run writes ~9 GB into tmp_path folders; with pytest's default ("all", 3 sessions)
    # CI's disk filled up with earlier runs' folders and every later test failed in setup.
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert int(pytestconfig.getini("tmp_path_retention_count")) <= 1
