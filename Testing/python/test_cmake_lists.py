"""The Slicer extension's CMake files: complete, and listing files that exist.

Static part: a small reader of the CMake commands these files use (set, list, file(GLOB...))
evaluates the module's file lists, so a missing file or a forgotten engine file fails here and
not on Slicer's extension build machines.

Configure part (needs cmake and a C/C++ compiler, skipped visibly otherwise): the real ``cmake``
configures the extension against a TEST-ONLY FakeSlicerStandIn of Slicer's CMake package (written
to a temporary folder by this test; it checks listed files exist like Slicer's macro does and
copies them to the build layout), then the engine is run from that build layout to show that
``PythonSlicer -m volseg`` with the module folder on PYTHONPATH finds its code and model cards.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "VolSegSlicer"
SCRIPTED_LIB_DIR = "lib/Slicer-5.10/qt-scripted-modules"


# ------------------------------------------------------------------------------------ a small CMake reader
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s()"]+)')


def _strip_comment(line: str) -> str:
    """The line without its ``#`` comment (a ``#`` inside a quoted argument is kept)."""
    quoted = False
    for i, char in enumerate(line):
        if char == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif char == "#" and not quoted:
            return line[:i]
    return line


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``(command name in lower case, arguments)`` for every command in a CMakeLists.txt."""
    text = "\n".join(_strip_comment(line) for line in path.read_text(encoding="utf-8").splitlines())
    commands = []
    for match in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(((?:[^()]|\([^()]*\))*)\)", text, re.S):
        args = [m.group(1) if m.group(1) is not None else m.group(2) for m in _TOKEN.finditer(match.group(2))]
        commands.append((match.group(1).lower(), args))
    return commands


def _expand(value: str, variables: dict[str, list[str]]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: ";".join(variables.get(m.group(1), [])), value)


def _glob(pattern: str, recursive: bool) -> list[Path]:
    base, _, name = pattern.rpartition("/")
    folder = Path(base)
    if not folder.is_dir():
        return []
    found = folder.rglob(name) if recursive else folder.glob(name)
    return [p for p in found if p.is_file()]


def evaluate(path: Path, variables: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Values of the variables after running the set/list/file(GLOB) commands of ``path``."""
    source_dir = path.parent
    variables = dict(variables or {})
    variables.setdefault("CMAKE_CURRENT_SOURCE_DIR", [str(source_dir)])
    for name, raw_args in cmake_commands(path):
        args = [piece for a in raw_args for piece in _expand(a, variables).split(";") if piece != ""]
        if name == "set" and args:
            variables[args[0]] = args[1:]
        elif name == "list" and args:
            op, var = args[0].upper(), args[1]
            if op == "APPEND":
                variables[var] = variables.get(var, []) + args[2:]
            elif op == "SORT":
                variables[var] = sorted(variables.get(var, []))
            elif op == "FILTER" and args[2:4] == ["EXCLUDE", "REGEX"]:
                regex = re.compile(args[4].replace("\\\\", "\\"))
                variables[var] = [v for v in variables.get(var, []) if not regex.search(v)]
        elif name == "file" and args and args[0] in ("GLOB", "GLOB_RECURSE"):
            var, rest = args[1], args[2:]
            relative = None
            if rest[:1] == ["RELATIVE"]:
                relative, rest = Path(rest[1]), rest[2:]
            rest = [r for r in rest if r not in ("CONFIGURE_DEPENDS", "LIST_DIRECTORIES")]
            files = []
            for pattern in rest:
                absolute = pattern if os.path.isabs(pattern) else str(source_dir / pattern)
                files += _glob(absolute, args[0] == "GLOB_RECURSE")
            variables[var] = [str(f.relative_to(relative) if relative else f) for f in files]
    return variables


def calls(path: Path, command: str) -> list[list[str]]:
    return [args for name, args in cmake_commands(path) if name == command.lower()]


# ------------------------------------------------------------------------------------ extension CMakeLists.txt
@pytest.fixture(scope="module")
def top() -> dict[str, list[str]]:
    return evaluate(REPO_ROOT / "CMakeLists.txt")


def test_extension_metadata_is_complete(top: dict) -> None:
    path = REPO_ROOT / "CMakeLists.txt"
    assert calls(path, "project") == [["VolSegSlicer"]]
    assert top["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert top["EXTENSION_CATEGORY"] == ["Segmentation"]
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                 "EXTENSION_SCREENSHOTURLS"):
        assert top.get(name) and top[name][0].strip(), name
    assert ["Slicer", "REQUIRED"] in calls(path, "find_package")
    includes = [args[0] for args in calls(path, "include")]
    assert includes == ["${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]
    assert calls(path, "add_subdirectory") == [["VolSegSlicer"], ["Testing"]]
    text = path.read_text(encoding="utf-8")
    assert re.search(r"if\(BUILD_TESTING\)\s*add_subdirectory\(Testing\)\s*endif\(\)", text)


def test_icon_and_screenshot_urls_point_at_files_in_this_repository(top: dict) -> None:
    urls = top["EXTENSION_ICONURL"] + top["EXTENSION_SCREENSHOTURLS"][0].split()
    for url in urls:
        match = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)", url)
        assert match, url
        assert (REPO_ROOT / match.group(1)).is_file(), f"{url} -> {match.group(1)} is not in the repository"
    from PIL import Image

    with Image.open(REPO_ROOT / "Resources" / "Icons" / "VolSegSlicer.png") as icon:
        assert icon.size == (128, 128)


def test_license_is_apache_2() -> None:
    text = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000  # the full text, not a notice


# ------------------------------------------------------------------------------------ module CMakeLists.txt
@pytest.fixture(scope="module")
def module() -> dict[str, list[str]]:
    return evaluate(MODULE_DIR / "CMakeLists.txt")


def test_module_is_built_as_a_scripted_module_with_its_tests(module: dict) -> None:
    path = MODULE_DIR / "CMakeLists.txt"
    assert module["MODULE_NAME"] == ["VolSegSlicer"]
    (build,) = calls(path, "slicerMacroBuildScriptedModule")
    assert build[build.index("NAME") + 1] == "${MODULE_NAME}"
    assert "SCRIPTS" in build and "RESOURCES" in build and "WITH_GENERIC_TESTS" in build
    assert calls(path, "slicer_add_python_unittest") == [["SCRIPT", "${MODULE_NAME}.py"]]
    text = path.read_text(encoding="utf-8")
    assert re.search(r"if\(BUILD_TESTING\)\s*#[^\n]*\n\s*slicer_add_python_unittest", text)


def test_every_listed_script_and_resource_exists(module: dict) -> None:
    scripts, resources = module["MODULE_PYTHON_SCRIPTS"], module["MODULE_PYTHON_RESOURCES"]
    assert scripts[0] == "VolSegSlicer.py"
    for name in scripts + resources:
        assert (MODULE_DIR / name).is_file(), f"VolSegSlicer/CMakeLists.txt lists a missing file: {name}"
    top_dir = MODULE_DIR / "../Resources"
    assert Path(module["VOLSEGSLICER_TOP_RESOURCES_DIR"][0]).resolve() == (REPO_ROOT / "Resources").resolve()
    for name in module["MODULE_TOP_RESOURCES"]:
        assert (top_dir / name).is_file(), f"missing resource Resources/{name}"


def test_every_engine_and_module_python_file_is_installed(module: dict) -> None:
    listed = set(module["MODULE_PYTHON_SCRIPTS"])
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for folder in ("volseg", "VolSegSlicerLib")
               for p in (MODULE_DIR / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert {"volseg/__init__.py", "volseg/__main__.py", "volseg/cli/main.py", "VolSegSlicerLib/process.py"} <= on_disk
    forgotten = sorted(on_disk - listed)
    assert not forgotten, f"Python files that the extension would not install: {forgotten}"
    schema_files = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "volseg" / "schema").glob("*.json")}
    assert schema_files and schema_files <= set(module["MODULE_PYTHON_RESOURCES"])


def test_panel_resources_and_model_cards_are_installed(module: dict) -> None:
    resources = set(module["MODULE_TOP_RESOURCES"])
    assert {"UI/VolSegSlicer.ui", "Icons/VolSegSlicer.png", "requirements.txt"} <= resources
    cards = {f"ModelCards/{p.name}" for p in (REPO_ROOT / "Resources" / "ModelCards").iterdir() if p.is_file()}
    assert "ModelCards/demo.json" in cards and cards <= resources


def test_testing_folder_registers_the_python_suite() -> None:
    path = REPO_ROOT / "Testing" / "CMakeLists.txt"
    tests = calls(path, "add_test")
    assert tests and tests[0][:2] == ["NAME", "py_VolSegSlicer_pytest"]
    assert "${CMAKE_CURRENT_SOURCE_DIR}/python" in tests[0]


# ------------------------------------------------------------------------------------ real configure
FAKE_SLICER_STAND_IN_CONFIG = r"""
# FakeSlicerStandIn: a TEST-ONLY stand-in for Slicer's CMake package (SlicerConfig.cmake), written
# by Testing/python/test_cmake_lists.py. It is not Slicer: it only defines what VolSegSlicer's
# CMake files call. Like Slicer's slicerMacroBuildScriptedModule it fails on a listed file that
# does not exist, and it copies SCRIPTS and RESOURCES where Slicer's build puts them.
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicerStandIn.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/EmptyStandIn.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/EmptyStandIn.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR @SCRIPTED_LIB_DIR@)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_SLICER_UNPARSED_ARGUMENTS}")
  endif()
  foreach(value ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${value})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${value}'")
    endif()
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${value}
                   ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${value} COPYONLY)
  endforeach()
  file(APPEND ${CMAKE_BINARY_DIR}/stand-in-record.txt
       "module ${MY_SLICER_NAME} generic_tests=${MY_SLICER_WITH_GENERIC_TESTS}\n")
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "TESTNAME_PREFIX;SCRIPT" "SLICER_ARGS" ${ARGN})
  get_filename_component(test_name ${MY_SCRIPT} NAME_WE)
  add_test(NAME py_${MY_TESTNAME_PREFIX}${test_name} COMMAND ${CMAKE_COMMAND} -E echo stand-in)
  file(APPEND ${CMAKE_BINARY_DIR}/stand-in-record.txt "unittest py_${MY_TESTNAME_PREFIX}${test_name}\n")
endmacro()
"""


@pytest.fixture(scope="module")
def configured(tmp_path_factory) -> Path:
    cmake = shutil.which("cmake")
    if cmake is None or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("cmake or a C++ compiler is not installed; the static CMake checks above still ran")
    stand_in = tmp_path_factory.mktemp("FakeSlicerStandIn")
    (stand_in / "SlicerConfig.cmake").write_text(
        FAKE_SLICER_STAND_IN_CONFIG.replace("@SCRIPTED_LIB_DIR@", SCRIPTED_LIB_DIR), encoding="utf-8")
    (stand_in / "UseSlicerStandIn.cmake").write_text("include(CTest)\n", encoding="utf-8")
    (stand_in / "EmptyStandIn.cmake").write_text("\n", encoding="utf-8")
    build = tmp_path_factory.mktemp("build")
    done = subprocess.run([cmake, "-S", str(REPO_ROOT), "-B", str(build), f"-DSlicer_DIR={stand_in}",
                           "-DBUILD_TESTING=ON"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build


def test_configure_succeeds_and_registers_the_self_test(configured: Path) -> None:
    record = (configured / "stand-in-record.txt").read_text(encoding="utf-8").splitlines()
    assert "module VolSegSlicer generic_tests=TRUE" in record
    assert "unittest py_VolSegSlicer" in record


def test_build_layout_holds_module_engine_and_resources(configured: Path) -> None:
    module_dir = configured / SCRIPTED_LIB_DIR
    for name in ("VolSegSlicer.py", "VolSegSlicerLib/process.py", "volseg/cli/main.py", "volseg/__main__.py",
                 "volseg/schema/model_card.schema.json", "Resources/UI/VolSegSlicer.ui",
                 "Resources/Icons/VolSegSlicer.png", "Resources/requirements.txt", "Resources/ModelCards/demo.json"):
        assert (module_dir / name).is_file(), name
    sys.path.insert(0, str(MODULE_DIR))
    try:
        from VolSegSlicerLib.resources import resource_dir
    finally:
        sys.path.remove(str(MODULE_DIR))
    assert resource_dir(module_dir) == module_dir / "Resources"  # the build finds its resources beside the module


def test_engine_runs_from_the_build_layout(configured: Path, tmp_path: Path) -> None:
    module_dir = configured / SCRIPTED_LIB_DIR
    env = dict(os.environ, PYTHONPATH=str(module_dir))
    done = subprocess.run([sys.executable, "-m", "volseg", "models", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    models = {m["id"]: m for m in json.loads(done.stdout)["models"]}
    assert "demo" in models
    assert Path(models["demo"]["card_path"]).resolve().is_relative_to(module_dir.resolve())
    assert fnmatch.fnmatch(models["demo"]["card_path"], "*/Resources/ModelCards/demo.json")
