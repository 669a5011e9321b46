from vidrep.data.synthetic import SHAPES
from vidrep.data.synthetic_voc import is_synthetic, main
from vidrep.data.voc import VOCError, read_voc
from vidrep.eval.report import comparison_rows


def test_the_command_writes_a_set_marked_synthetic_and_its_results_are_never_called_voc(tmp_path, capsys):
    main([str(tmp_path), "--trainval", "3", "--test", "2"])
    assert "voc.classes='[circle,square,triangle,ellipse,diamond]'" in capsys.readouterr().out
    assert is_synthetic(tmp_path, 2007) and not is_synthetic(tmp_path, 2012)
    assert len(read_voc(tmp_path, 2007, "test", SHAPES)) == 2
    result = {
        "row": "unsup + ft (1.5M)",
        "label": "x",
        "protocol": {"name": "detection"},
        "map": 0.5,
        "data": {"year": 2007, "test_split": "test", "name": "synthetic VOC-format", "synthetic": True},
    }
    _, (row,) = comparison_rows([result], ["r.json"])
    assert row[3] == "synthetic VOC-format test" and row[6] == "- (synthetic data)"


def test_a_wrong_class_names_voc_classes(tmp_path):
    main([str(tmp_path), "--trainval", "2", "--test", "1"])
    try:
        read_voc(tmp_path, 2007, "trainval")
    except VOCError as e:
        assert "voc.classes='[circle,square,triangle,ellipse,diamond]'" in str(e)
    else:
        raise AssertionError("the VOC class list accepted shape classes")
