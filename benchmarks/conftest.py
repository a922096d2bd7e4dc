"""pytest-benchmark suite options: ``--large`` adds 2**25 elements and the width-768 model."""


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true", help="include 2**25 and the 85M-element model")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        from flatopt import bench

        large = metafunc.config.getoption("--large")
        sizes = [2**10, 2**16, 2**20, 2**23] + ([2**25] if large else [])
        widths = [128] + ([768] if large else [])
        cases = [bench.flat_case(n) for n in sizes] + [bench.model_case(w) for w in widths]
        metafunc.parametrize("case", cases, ids=[c.name.split(" (")[0].replace(" ", "").replace("2**", "2pow") for c in cases])
