"""The same bad input through both faces: each message names the setting the way that face's
user sees it — the flag on the command line, the dialog's label in QGIS — and never the other's."""

from __future__ import annotations

import pytest

from casd_core.cli import main

# (CLI arguments, Processing parameters, the CLI's name, the dialog's name)
BAD_INPUTS = [
    pytest.param(["--tile-size", "1000"], {"TILE_SIZE": 1000}, "--tile-size", '"Tile size"',
                 id="tile bigger than the raster"),
    pytest.param(["--bands", "1,2"], {"BANDS": [1, 2]}, "--bands", '"Bands"',
                 id="too few bands for the model"),
    pytest.param(["--extent", "0", "0", "10", "10"], {"EXTENT": "0,10,0,10 [EPSG:28992]"}, "--extent",
                 '"Extent"', id="extent outside the raster"),
]


@pytest.mark.parametrize("cli_args, parameters, flag, label", BAD_INPUTS)
def test_each_face_names_the_setting_in_its_own_terms(cli_args, parameters, flag, label, provider, rasters,
                                                       tiny_package, tmp_path, capsys):
    import processing
    from qgis.core import QgsProcessingException

    raster = str(rasters / "test_tiled.tif")
    code = main(["predict", raster, "-o", str(tmp_path / "out.gpkg"), "-m", str(tiny_package),
                 "--device", "cpu", *cli_args])
    cli_message = capsys.readouterr().err
    assert code == 2 and cli_message.count("\n") == 1, cli_message
    assert flag in cli_message and label not in cli_message

    with pytest.raises(QgsProcessingException) as raised:
        processing.run("casd:classifyraster", {"INPUT": raster, "MODEL": str(tiny_package), "DEVICE": 1,
                                               "OUTPUT": "TEMPORARY_OUTPUT", **parameters})
    dialog_message = str(raised.value)
    assert label in dialog_message and flag not in dialog_message
    # the rest of the message is the same sentence in both faces
    assert cli_message.split(": error: ", 1)[1].strip().replace(flag, label) == dialog_message
    assert not (tmp_path / "out.gpkg").exists()
