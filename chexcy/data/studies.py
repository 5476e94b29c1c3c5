"""`StudyIndex`: the images of a prepared dataset grouped by study, for models that take several views."""
import numpy as np


class StudyIndex:
    """One entry per study, in order of the study's first row in the dataset. Attributes (M studies):

    study_ids: list of M ids ("patientNNNNN/studyK"); patients: list of M patient ids;
    frontal, lateral: int64 (M,) dataset row of the study's first frontal / first lateral image, -1 if none;
    labels: float32 (M, 14) the study's targets (from its frontal row, else its lateral row; CheXpert labels
    belong to the study, so its views agree); tabular: float32 (M, 2) (age / 100, sex code) of that row;
    age: float32 (M,) years and sex: list of M strings ("Male", "Female", "Unknown") of that row;
    rows: list of M int64 arrays, every dataset row of the study.
    """

    def __init__(self, dataset):
        meta = dataset.meta
        groups = meta.groupby("study", sort=False).indices          # study -> row positions, first-seen order
        self.study_ids = list(groups)
        m = len(self.study_ids)
        self.frontal = np.full(m, -1, dtype=np.int64)
        self.lateral = np.full(m, -1, dtype=np.int64)
        self.rows = []
        views = meta["view"].to_numpy()
        patients = meta["patient"].to_numpy()
        self.patients = []
        for i, study in enumerate(self.study_ids):
            rows = np.sort(np.asarray(groups[study], dtype=np.int64))
            self.rows.append(rows)
            self.patients.append(patients[rows[0]])
            frontal = rows[views[rows] == "Frontal"]
            lateral = rows[views[rows] == "Lateral"]
            if len(frontal):
                self.frontal[i] = frontal[0]
            if len(lateral):
                self.lateral[i] = lateral[0]
        representative = np.where(self.frontal >= 0, self.frontal, self.lateral)
        self.labels = dataset.labels[representative].astype(np.float32)
        self.tabular = dataset.tabular[representative].astype(np.float32)
        self.age = meta["age"].to_numpy(np.float32)[representative]
        self.sex = [str(v) for v in meta["sex"].to_numpy()[representative]]

    def __len__(self):
        return len(self.study_ids)

    def __repr__(self):
        both = int(((self.frontal >= 0) & (self.lateral >= 0)).sum())
        return f"StudyIndex({len(self)} studies, {both} with frontal and lateral views)"
