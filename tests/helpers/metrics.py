"""Reading Prometheus' text format as the tests do: the API's /metrics, a worker's, and the dashboard's series."""

from __future__ import annotations

import re

LABEL = r'[a-z_]+="(?:[^"\\\n]|\\.)*"'  # Prometheus' text format: \\, \" and \n escaped


def samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} for every sample line; checks each family is declared before its samples (a
    histogram's as NAME_bucket, NAME_sum and NAME_count)."""
    declared, found = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared[line.split()[2]] = line.split()[3]
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert re.match(rf"^[a-z_]+(\{{{LABEL}(,{LABEL})*\}})?$", name), line
            family = name.split("{")[0]
            if family not in declared:
                family = re.sub(r"_(bucket|sum|count)$", "", family)
                assert declared.get(family) == "histogram", line
            found[canonical(name)] = float(value)
    return found


def canonical(name: str) -> str:
    """The series' name with its labels in sorted order (the text format does not fix their order)."""
    if "{" not in name:
        return name
    family, labels = name[:-1].split("{", 1)
    return family + "{" + ",".join(sorted(re.findall(LABEL, labels))) + "}"


def series(family: str, **labels: str) -> str:
    return canonical(family + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}") if labels else family
