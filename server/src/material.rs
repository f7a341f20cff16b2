//! Dual-energy material classes ([`Material`]) and the calibration that
//! tells them apart for one scanner ([`Calibration`], [`Calibrations`]).
//!
//! A ray's class comes from its attenuations at both energies,
//! `p_high = ln(I0/I_high)` and `p_low = ln(I0/I_low)`, through the ratio
//! `R = p_low / p_high`: each material's `R` is a curve over `p_high`
//! (beam hardening) that depends on the scanner's two spectra. A calibration
//! holds three reference curves (organic, light inorganic, metal) as
//! straight lines `R = r0 + slope * p_high`, and a ray takes the class of the
//! nearest one. The curves are measured on a scanner (or computed from its
//! spectra); [`Calibration::derive`] fits them to pixels of known materials.
//! At MeV energies (cargo linacs) pair production makes `R` fall with the
//! atomic number; at kV energies (X-ray tubes) photoabsorption makes it
//! rise: nearest-curve classification works either way.

use serde::{Deserialize, Serialize};

/// The material classes of dual-energy colouring, in the customary colours
/// of analyst stations ([`Material::colour`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Material {
    /// Next to nothing in the beam: white.
    Air,
    /// Low effective atomic number (food, wood, paper, plastics, drugs): orange.
    Organic,
    /// Light inorganic matter (aluminium, glass, stone) or organic and metal
    /// together along the ray: green.
    Mixed,
    /// Metal (iron, steel and heavier): blue.
    Inorganic,
    /// Too little got through to tell: black.
    Heavy,
}

impl Material {
    /// The class's colour.
    pub fn colour(self) -> [u8; 3] {
        match self {
            Material::Air => [255, 255, 255],
            Material::Organic => [245, 150, 40],
            Material::Mixed => [60, 175, 70],
            Material::Inorganic => [50, 110, 230],
            Material::Heavy => [0, 0, 0],
        }
    }
}

/// High-energy attenuation below which the built-in calibration calls a ray
/// air (transmission above 95 %).
pub const AIR_ATTENUATION: f32 = 0.05;
/// High-energy attenuation above which the built-in calibration calls a ray
/// impenetrable (transmission below 0.25 %, about 20 cm of steel at 6 MV).
pub const HEAVY_ATTENUATION: f32 = 6.0;

/// A reference material's ratio `R = p_low / p_high` as a line over
/// `p_high`: `[r0, slope]` in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ratio(pub f32, pub f32);

impl Ratio {
    /// `R` at high-energy attenuation `p_high`.
    pub fn at(self, p_high: f32) -> f32 {
        self.0 + self.1 * p_high
    }
}

/// One scanner's material calibration (a `[[web.materials]]` entry): which
/// scans it is for, and its reference curves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Shown in the viewer beside the material switch.
    pub name: String,
    /// Scans whose `metadata.scanner.manufacturer` is this (any case); empty: any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manufacturer: String,
    /// Scans whose `metadata.scanner.model` is this (any case); empty: any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Scans whose `metadata.source.peak_kv` is this (within 1 kV); 0: any.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub peak_kv: f64,
    /// Scans whose `metadata.source.low_kv` is this (within 1 kV); 0: any.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub low_kv: f64,
    /// `p_high` below which a ray is air.
    #[serde(default = "default_air")]
    pub air_below: f32,
    /// `p_high` above which too little got through to tell.
    #[serde(default = "default_heavy")]
    pub heavy_above: f32,
    /// Organic matter (water, polyethylene).
    pub organic: Ratio,
    /// Light inorganic matter (aluminium); also what organic matter and metal
    /// together along a ray give.
    pub mixed: Ratio,
    /// Metal (iron, steel).
    pub inorganic: Ratio,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn default_air() -> f32 {
    AIR_ATTENUATION
}

fn default_heavy() -> f32 {
    HEAVY_ATTENUATION
}

impl Calibration {
    /// The calibration built into niix: the 6/4 MV linac pair of `niix
    /// synth`'s scanner (fixtures/synth/src/physics.rs, NIST XCOM
    /// coefficients), whose water-like, aluminium-like and steel rays give
    /// `R` of 1.249..1.261, 1.229..1.222 and 1.194..1.164 as `p_high` grows
    /// from 0 to 6 (a test checks these lines against the physics).
    pub fn builtin() -> Calibration {
        Calibration {
            name: "built-in 6/4 MV linac".into(),
            manufacturer: String::new(),
            model: String::new(),
            peak_kv: 6000.0,
            low_kv: 4000.0,
            air_below: AIR_ATTENUATION,
            heavy_above: HEAVY_ATTENUATION,
            organic: Ratio(1.251, 0.0019),
            mixed: Ratio(1.231, -0.0014),
            inorganic: Ratio(1.194, -0.0053),
        }
    }

    /// The class of a ray from its attenuations at both energies.
    pub fn classify(&self, p_high: f32, p_low: f32) -> Material {
        if p_high < self.air_below {
            return Material::Air;
        }
        if p_high > self.heavy_above {
            return Material::Heavy;
        }
        let r = p_low / p_high;
        let off = |line: Ratio| (r - line.at(p_high)).abs();
        let (o, m, i) = (off(self.organic), off(self.mixed), off(self.inorganic));
        if o <= m && o <= i {
            Material::Organic
        } else if m <= i {
            Material::Mixed
        } else {
            Material::Inorganic
        }
    }

    /// Whether this calibration is for a scan by `scanner` at `source`
    /// energies: every criterion given must hold.
    pub fn matches(&self, manufacturer: &str, model: &str, peak_kv: f64, low_kv: f64) -> bool {
        let text = |want: &str, got: &str| want.trim().is_empty() || want.trim().eq_ignore_ascii_case(got.trim());
        let kv = |want: f64, got: f64| want == 0.0 || (want - got).abs() <= 1.0;
        text(&self.manufacturer, manufacturer)
            && text(&self.model, model)
            && kv(self.peak_kv, peak_kv)
            && kv(self.low_kv, low_kv)
    }

    /// Checks that the calibration can tell the classes apart: a name,
    /// `0 <= air_below < heavy_above`, finite lines, and the mixed line
    /// strictly between the other two over that whole range.
    pub fn check(&self) -> Result<(), String> {
        let name = &self.name;
        if name.trim().is_empty() {
            return Err("a [[web.materials]] entry needs a name".into());
        }
        if !(self.air_below >= 0.0 && self.heavy_above > self.air_below && self.heavy_above.is_finite()) {
            return Err(format!(
                "material calibration {name:?}: air_below ({}) must be at least 0 and below heavy_above ({})",
                self.air_below, self.heavy_above
            ));
        }
        let lines = [self.organic, self.mixed, self.inorganic];
        if lines.iter().any(|l| !l.0.is_finite() || !l.1.is_finite()) {
            return Err(format!(
                "material calibration {name:?}: the organic, mixed and inorganic lines must be finite"
            ));
        }
        for p in [self.air_below, self.heavy_above] {
            let (o, m, i) = (self.organic.at(p), self.mixed.at(p), self.inorganic.at(p));
            if !((o < m && m < i) || (o > m && m > i)) {
                return Err(format!(
                    "material calibration {name:?}: at p_high {p} the mixed ratio ({m}) must lie strictly between the \
                     organic ({o}) and inorganic ({i}) ones"
                ));
            }
        }
        Ok(())
    }

    /// Fits a calibration to rays of known material: `(p_high, p_low)` pairs
    /// of organic, light inorganic and metal pixels of a calibration scan
    /// (e.g. step wedges of polyethylene or water, aluminium and steel),
    /// each reference line by least squares of `R` over `p_high`. Rays
    /// outside the built-in air and heavy limits are left out. An error when
    /// a material has too few distinct attenuations to fit a line, or the
    /// lines do not pass [`Calibration::check`].
    pub fn derive(
        name: &str,
        organic: &[(f32, f32)],
        mixed: &[(f32, f32)],
        inorganic: &[(f32, f32)],
    ) -> Result<Calibration, String> {
        let fit = |what: &str, rays: &[(f32, f32)]| -> Result<Ratio, String> {
            let pts: Vec<(f64, f64)> = rays
                .iter()
                .filter(|(h, _)| (AIR_ATTENUATION..=HEAVY_ATTENUATION).contains(h))
                .map(|&(h, l)| (f64::from(h), f64::from(l) / f64::from(h)))
                .collect();
            let n = pts.len() as f64;
            let (sx, sy) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
            let (mx, my) = (sx / n, sy / n);
            let sxx: f64 = pts.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
            let sxy: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
            if pts.len() < 2 || sxx < 1e-6 {
                return Err(format!(
                    "{what}: {} usable measurements; a calibration needs measurements over a range of thicknesses \
                     (several steps of a wedge, p_high between {AIR_ATTENUATION} and {HEAVY_ATTENUATION})",
                    pts.len()
                ));
            }
            let slope = sxy / sxx;
            // Four decimals of R and five of its slope: well within what a
            // calibration scan measures, and readable in a config file.
            let round = |v: f64, places: i32| ((v * 10f64.powi(places)).round() / 10f64.powi(places)) as f32;
            Ok(Ratio(round(my - slope * mx, 4), round(slope, 5)))
        };
        let c = Calibration {
            name: name.to_string(),
            manufacturer: String::new(),
            model: String::new(),
            peak_kv: 0.0,
            low_kv: 0.0,
            air_below: AIR_ATTENUATION,
            heavy_above: HEAVY_ATTENUATION,
            organic: fit("organic", organic)?,
            mixed: fit("mixed", mixed)?,
            inorganic: fit("inorganic", inorganic)?,
        };
        c.check()?;
        Ok(c)
    }
}

/// The configured calibrations, in order, then the built-in one.
#[derive(Debug, Clone)]
pub struct Calibrations {
    configured: Vec<Calibration>,
    builtin: Calibration,
}

impl Default for Calibrations {
    fn default() -> Self {
        Calibrations { configured: Vec::new(), builtin: Calibration::builtin() }
    }
}

impl Calibrations {
    /// The configured entries ([`Calibration::check`]ed), tried in order.
    pub fn new(configured: &[Calibration]) -> Result<Self, String> {
        for c in configured {
            c.check()?;
        }
        Ok(Calibrations { configured: configured.to_vec(), builtin: Calibration::builtin() })
    }

    /// The calibration for a scan by this scanner at these energies: the
    /// first configured entry that matches, else the built-in one.
    pub fn for_scan(&self, manufacturer: &str, model: &str, peak_kv: f64, low_kv: f64) -> &Calibration {
        self.configured.iter().find(|c| c.matches(manufacturer, model, peak_kv, low_kv)).unwrap_or(&self.builtin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use niix_synth::physics::{HIGH, LOW, transmission};

    /// `(p_high, p_low)` of a noise-free ray of niix synth's scanner.
    fn ray(steel: f64, organic: f64, mineral: f64) -> (f32, f32) {
        let p = |s| -(transmission(s, steel, organic, mineral).ln()) as f32;
        (p(HIGH), p(LOW))
    }

    #[test]
    fn the_builtin_lines_follow_the_synthetic_scanners_physics() {
        let c = Calibration::builtin();
        c.check().unwrap();
        for a in (1..200).map(|a| f64::from(a) * 2.0) {
            for (line, (h, l)) in
                [(c.organic, ray(0.0, a, 0.0)), (c.mixed, ray(0.0, 0.0, a)), (c.inorganic, ray(a, 0.0, 0.0))]
            {
                if (AIR_ATTENUATION..HEAVY_ATTENUATION).contains(&h) {
                    assert!((l / h - line.at(h)).abs() < 0.004, "{a} g/cm2: R {} against {}", l / h, line.at(h));
                }
            }
        }
    }

    #[test]
    fn classes_follow_the_attenuation_ratio_of_the_synthetic_scanner() {
        let c = Calibration::builtin();
        let class = |s, o, m| {
            let (h, l) = ray(s, o, m);
            c.classify(h, l)
        };
        for a in [5.0, 20.0, 60.0, 100.0] {
            assert_eq!(class(0.0, a, 0.0), Material::Organic, "{a} g/cm2 organic");
            assert_eq!(class(0.0, 0.0, a), Material::Mixed, "{a} g/cm2 aluminium-like");
        }
        for a in [5.0, 20.0, 60.0, 120.0] {
            assert_eq!(class(a, 0.0, 0.0), Material::Inorganic, "{a} g/cm2 steel");
        }
        // Organic behind a steel plate reads mixed; 25 cm of steel is impenetrable.
        assert_eq!(class(0.0, 150.0, 0.0), Material::Organic);
        assert_eq!(class(30.0, 20.0, 0.0), Material::Mixed);
        assert_eq!(class(200.0, 0.0, 0.0), Material::Heavy);
        assert_eq!(class(0.2, 0.0, 0.0), Material::Air);
    }

    /// A kV scanner's calibration: `R` rises with the atomic number.
    fn tube() -> Calibration {
        Calibration {
            name: "160/80 kV tube".into(),
            model: "HX-160".into(),
            organic: Ratio(1.35, 0.0),
            mixed: Ratio(1.9, 0.0),
            inorganic: Ratio(3.0, -0.05),
            ..Calibration::builtin()
        }
    }

    #[test]
    fn a_scanner_whose_ratio_rises_with_atomic_number_is_classified_too() {
        let c = tube();
        c.check().unwrap();
        assert_eq!(c.classify(1.0, 1.3), Material::Organic);
        assert_eq!(c.classify(1.0, 2.0), Material::Mixed);
        assert_eq!(c.classify(1.0, 2.9), Material::Inorganic);
        // The built-in linac calibration reads the same ray as organic.
        assert_eq!(Calibration::builtin().classify(1.0, 2.9), Material::Organic);
    }

    #[test]
    fn the_first_matching_entry_wins_and_the_builtin_one_is_last() {
        let by_energy =
            Calibration { name: "450/200".into(), model: String::new(), peak_kv: 450.0, low_kv: 200.0, ..tube() };
        let by_model = Calibration { peak_kv: 0.0, low_kv: 0.0, ..tube() };
        let all = Calibrations::new(&[by_energy, by_model]).unwrap();
        assert_eq!(all.for_scan("X", "hx-160 ", 160.0, 80.0).name, "160/80 kV tube");
        assert_eq!(all.for_scan("X", "other", 450.4, 200.0).name, "450/200");
        assert_eq!(all.for_scan("X", "other", 6000.0, 4000.0).name, "built-in 6/4 MV linac");
        assert_eq!(Calibrations::default().for_scan("", "", 0.0, 0.0).name, "built-in 6/4 MV linac");
    }

    #[test]
    fn calibrations_that_cannot_tell_classes_apart_are_refused() {
        let swapped = Calibration { mixed: Ratio(1.3, 0.0), ..Calibration::builtin() };
        let e = Calibrations::new(&[swapped]).unwrap_err();
        assert!(e.contains("strictly between"), "{e}");
        let e = Calibration { air_below: 7.0, ..Calibration::builtin() }.check().unwrap_err();
        assert!(e.contains("air_below"), "{e}");
        let e = Calibration { organic: Ratio(f32::NAN, 0.0), ..Calibration::builtin() }.check().unwrap_err();
        assert!(e.contains("finite"), "{e}");
        assert!(Calibration { name: " ".into(), ..Calibration::builtin() }.check().is_err());
    }

    #[test]
    fn a_calibration_derived_from_step_wedges_matches_the_physics() {
        // Step wedges of water, aluminium and steel on the synthetic scanner.
        let wedge = |f: &dyn Fn(f64) -> (f32, f32)| (1..60).map(|i| f(f64::from(i) * 4.0)).collect::<Vec<_>>();
        let c = Calibration::derive(
            "wedges",
            &wedge(&|a| ray(0.0, a, 0.0)),
            &wedge(&|a| ray(0.0, 0.0, a)),
            &wedge(&|a| ray(a, 0.0, 0.0)),
        )
        .unwrap();
        let b = Calibration::builtin();
        for p in [0.5, 3.0, 5.5] {
            for (x, y) in [(c.organic, b.organic), (c.mixed, b.mixed), (c.inorganic, b.inorganic)] {
                assert!((x.at(p) - y.at(p)).abs() < 0.003, "at {p}: {x:?} against {y:?}");
            }
        }
        let e = Calibration::derive("flat", &[(1.0, 1.25)], &[(1.0, 1.23)], &[(1.0, 1.19)]).unwrap_err();
        assert!(e.contains("range of thicknesses"), "{e}");
    }
}
