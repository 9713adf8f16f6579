//! Register layout of the `g` packet, learnt from the stub's target description XML.

use super::AttachError;

/// Most registers accepted from a target description.
const MAX_REGS: usize = 512;

/// One register of the `g` packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegDesc {
    /// Register name (`rax`, `rip`, `cr3`, ...).
    pub name: String,
    /// Width in bits.
    pub bitsize: u32,
    /// Register number (position in `g`).
    pub regnum: u32,
}

/// The `g` packet layout: registers in register-number order with byte offsets.
#[derive(Debug, Clone, Default)]
pub struct RegLayout {
    regs: Vec<(RegDesc, usize)>,
}

/// Value of attribute `name` in an XML start tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = tag;
    loop {
        let i = rest.find(name)?;
        let before = rest[..i].chars().last();
        let after = &rest[i + name.len()..];
        let after_trim = after.trim_start();
        if before.is_some_and(char::is_whitespace) && after_trim.starts_with('=') {
            let v = after_trim[1..].trim_start();
            let q = v.chars().next()?;
            if q != '"' && q != '\'' {
                return None;
            }
            let end = v[1..].find(q)?;
            return Some(&v[1..1 + end]);
        }
        rest = after;
    }
}

/// Start tags named `element` in `xml` (the text between `<element` and `>`).
fn tags<'a>(xml: &'a str, element: &str) -> Vec<&'a str> {
    let open = format!("<{element}");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        // Must be the whole element name.
        if !after.starts_with(|c: char| c.is_whitespace() || c == '/' || c == '>') {
            rest = after;
            continue;
        }
        let Some(end) = after.find('>') else { break };
        out.push(&after[..end]);
        rest = &after[end..];
    }
    out
}

/// `xml` without `<!-- comments -->` (QEMU comments out registers it does not send).
fn strip_comments(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(i) = rest.find("<!--") {
        out.push_str(&rest[..i]);
        match rest[i + 4..].find("-->") {
            Some(j) => rest = &rest[i + 4 + j + 3..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// Files that `xml` includes (`<xi:include href="..."/>`).
pub fn includes(xml: &str) -> Vec<String> {
    tags(&strip_comments(xml), "xi:include")
        .into_iter()
        .filter_map(|t| attr(t, "href"))
        .map(str::to_string)
        .collect()
}

impl RegLayout {
    /// Builds the layout from target description documents in document order (the main
    /// document's registers, then each included file's, in include order).
    pub fn from_xml(docs: &[String]) -> Result<RegLayout, AttachError> {
        let mut regs = Vec::new();
        let mut next = 0u32;
        for doc in docs {
            let doc = strip_comments(doc);
            for t in tags(&doc, "reg") {
                let name = attr(t, "name").ok_or_else(|| bad("reg without name"))?;
                let bitsize: u32 = attr(t, "bitsize")
                    .and_then(|b| b.parse().ok())
                    .filter(|b| *b > 0 && *b <= 1024 && b % 8 == 0)
                    .ok_or_else(|| bad("reg with a bad bitsize"))?;
                let regnum = match attr(t, "regnum") {
                    Some(n) => n.parse().map_err(|_| bad("bad regnum"))?,
                    None => next,
                };
                next = regnum.checked_add(1).ok_or_else(|| bad("bad regnum"))?;
                if regs.len() >= MAX_REGS {
                    return Err(bad("too many registers"));
                }
                regs.push(RegDesc {
                    name: name.to_string(),
                    bitsize,
                    regnum,
                });
            }
        }
        regs.sort_by_key(|r| r.regnum);
        let mut out = Vec::with_capacity(regs.len());
        let mut off = 0usize;
        for r in regs {
            let size = (r.bitsize / 8) as usize;
            out.push((r, off));
            off += size;
        }
        if out.is_empty() {
            return Err(bad("no registers"));
        }
        Ok(RegLayout { regs: out })
    }

    /// Byte offset and size of register `name` in the `g` packet.
    pub fn find(&self, name: &str) -> Option<(usize, usize)> {
        self.regs
            .iter()
            .find(|(r, _)| r.name == name)
            .map(|(r, off)| (*off, (r.bitsize / 8) as usize))
    }

    /// Register number of `name`.
    pub fn regnum(&self, name: &str) -> Option<u32> {
        self.regs
            .iter()
            .find(|(r, _)| r.name == name)
            .map(|(r, _)| r.regnum)
    }

    /// Reads register `name` (little-endian, at most 8 bytes used) from a `g` reply.
    pub fn get(&self, g: &[u8], name: &str) -> Option<u64> {
        let (off, size) = self.find(name)?;
        let bytes = g.get(off..off.checked_add(size)?)?;
        let mut v = [0u8; 8];
        let n = size.min(8);
        v[..n].copy_from_slice(&bytes[..n]);
        Some(u64::from_le_bytes(v))
    }

    /// All registers.
    pub fn regs(&self) -> impl Iterator<Item = &RegDesc> {
        self.regs.iter().map(|(r, _)| r)
    }
}

fn bad(msg: &str) -> AttachError {
    AttachError::Protocol(format!("target description: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layout() {
        let main = r#"<?xml version="1.0"?><target><architecture>i386:x86-64</architecture>
            <xi:include href="i386-64bit.xml"/></target>"#
            .to_string();
        assert_eq!(includes(&main), vec!["i386-64bit.xml"]);
        let inc = r#"<feature name="org.gnu.gdb.i386.core">
            <reg name="rax" bitsize="64" type="int64"/>
            <reg name="rbx" bitsize="64" type="int64"/>
            <reg name="eflags" bitsize="32" type="i386_eflags"/>
            <reg name="cs" bitsize="32" type="int32"/>
            <!--reg name="cs_base" bitsize="64"/>
            <reg name="ss_base" bitsize="64"/-->
            <reg name="cr3" bitsize="64" regnum="10"/>
            <register name="junk" bitsize="8"/>
            </feature>"#
            .to_string();
        let l = RegLayout::from_xml(&[main, inc]).unwrap();
        assert_eq!(l.find("rax"), Some((0, 8)));
        assert_eq!(l.find("eflags"), Some((16, 4)));
        assert_eq!(l.find("cs"), Some((20, 4)));
        assert_eq!(l.find("cr3"), Some((24, 8)));
        assert_eq!(l.regnum("cr3"), Some(10));
        assert_eq!(l.find("junk"), None);
        let mut g = vec![0u8; 32];
        g[24] = 0x10;
        g[25] = 0x20;
        assert_eq!(l.get(&g, "cr3"), Some(0x2010));
        assert_eq!(l.get(&g[..20], "cs"), None);
    }

    #[test]
    fn rejects_bad_xml() {
        assert!(RegLayout::from_xml(&["<reg bitsize=\"64\"/>".into()]).is_err());
        assert!(RegLayout::from_xml(&["<reg name=\"a\" bitsize=\"7\"/>".into()]).is_err());
        assert!(RegLayout::from_xml(&["<target/>".into()]).is_err());
    }
}
