//! Which customs sites a caller may act for.
//!
//! A token or certificate entry with `sites = ["NLRTM"]` scopes its holder:
//! a scanner may push only scans whose `site_id` is in scope, an officer
//! sees, reads and adjudicates only such scans. A scope entry matches the
//! site id itself and every site id under it written `<entry>-<suffix>`, so
//! `NLRTM` covers `NLRTM` and `NLRTM-01` but not `NLRTMX`. No entry (or an
//! empty list) means every site.
//!
//! Authentication puts a [`SiteScope`] into each request's extensions; the
//! services read it with [`SiteScope::of`].

use std::sync::Arc;

/// The sites a caller may act for; `None` inside means every site.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteScope(Option<Arc<[String]>>);

impl SiteScope {
    /// Every site.
    pub fn all() -> Self {
        SiteScope(None)
    }

    /// Only these sites (an empty list means every site).
    pub fn only(sites: &[String]) -> Self {
        if sites.is_empty() { SiteScope(None) } else { SiteScope(Some(sites.iter().cloned().collect())) }
    }

    /// The scope of a request: set by authentication, else every site.
    pub fn of<T>(request: &tonic::Request<T>) -> SiteScope {
        request.extensions().get::<SiteScope>().cloned().unwrap_or_default()
    }

    /// The scope entries, `None` for every site.
    pub fn sites(&self) -> Option<&[String]> {
        self.0.as_deref()
    }

    /// True when the caller may act for `site_id`.
    pub fn allows(&self, site_id: &str) -> bool {
        match &self.0 {
            None => true,
            Some(sites) => sites.iter().any(|s| covers(s, site_id)),
        }
    }
}

/// True when the scope entry `entry` covers `site_id`.
pub fn covers(entry: &str, site_id: &str) -> bool {
    site_id == entry || site_id.strip_prefix(entry).is_some_and(|rest| rest.starts_with('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_covers_its_site_and_the_sites_under_it() {
        let s = SiteScope::only(&["NLRTM".into(), "BEANR-02".into()]);
        assert!(s.allows("NLRTM") && s.allows("NLRTM-01") && s.allows("BEANR-02"));
        assert!(!s.allows("NLRTMX") && !s.allows("BEANR-01") && !s.allows("BEANR") && !s.allows(""));
        assert!(SiteScope::only(&[]).allows("ANY") && SiteScope::all().allows("ANY"));
    }
}
